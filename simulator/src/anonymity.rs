//! Sender anonymity as a global passive observer measures it.
//!
//! For each delivered message the observer assigns every possible sender a probability; from
//! that distribution come the **Shannon entropy** `H = -Σ p log2 p` (bits), the **anonymity
//! set** `2^H` (the number of equally likely senders that would give the same uncertainty) and
//! the **normalised degree** `H / log2 N` for a population of `N` senders (1: every sender
//! equally likely; 0: the sender is known).
//!
//! The observer's model ([`timing_distribution`]): it saw every packet enter the network (sender,
//! time) and the message leave it at `t_out`; a packet sent at `t_in` explains the exit with
//! the likelihood of a network delay of `t_out - t_in - fixed` under the mixing delay
//! distribution. With per-hop exponential delays of mean `μ` over `k` delaying hops, the total
//! delay is Erlang(`k`, `μ`) ([`erlang_pdf`]); the weights are summed per sender and
//! normalised. The **timing-correlation attack** guesses the sender with the highest
//! probability ([`best_guess`]).

/// Entropy, anonymity set and normalised degree of one message.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Anonymity {
    /// Shannon entropy in bits.
    pub entropy_bits: f64,
    /// `2^H`.
    pub anonymity_set: f64,
    /// `H / log2 N` (0 when `N` ≤ 1).
    pub normalised_degree: f64,
}

/// The Shannon entropy (bits) of a distribution given by non-negative weights (normalised
/// here; zero and non-finite weights count as zero). An empty or all-zero input has entropy 0.
pub fn entropy_bits(weights: &[f64]) -> f64 {
    let total: f64 = weights.iter().filter(|w| w.is_finite() && **w > 0.0).sum();
    if total <= 0.0 {
        return 0.0;
    }
    let h: f64 = weights
        .iter()
        .filter(|w| w.is_finite() && **w > 0.0)
        .map(|w| {
            let p = w / total;
            -p * p.log2()
        })
        .sum();
    h.max(0.0)
}

/// The metrics of a distribution over senders in a population of `population` senders.
pub fn anonymity(weights: &[f64], population: usize) -> Anonymity {
    let h = entropy_bits(weights);
    let max = if population > 1 {
        (population as f64).log2()
    } else {
        0.0
    };
    Anonymity {
        entropy_bits: h,
        anonymity_set: h.exp2(),
        normalised_degree: if max > 0.0 { (h / max).min(1.0) } else { 0.0 },
    }
}

/// Density of the sum of `k` independent exponential delays of mean `mean_ms` (Erlang), at
/// `x_ms`. `k = 0` (mixing off) is a point mass at 0, returned as 1 for `x` within
/// `tolerance_ms` of 0 and 0 elsewhere.
pub fn erlang_pdf(k: u32, mean_ms: f64, x_ms: f64, tolerance_ms: f64) -> f64 {
    if k == 0 || mean_ms <= 0.0 {
        return if x_ms.abs() <= tolerance_ms { 1.0 } else { 0.0 };
    }
    if x_ms < 0.0 {
        return 0.0;
    }
    let lambda = 1.0 / mean_ms;
    // λ^k x^(k-1) e^(-λx) / (k-1)!, in logs for large k.
    let k_f = f64::from(k);
    let log_fact: f64 = (1..k).map(|i| f64::from(i).ln()).sum();
    let log_pdf = k_f * lambda.ln() + (k_f - 1.0) * x_ms.max(f64::MIN_POSITIVE).ln()
        - lambda * x_ms
        - log_fact;
    log_pdf.exp()
}

/// One packet the observer saw enter the network.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Entry {
    /// Sender index (`0..population`).
    pub sender: usize,
    /// When it entered, ms.
    pub at_ms: f64,
}

/// The observer's probability over senders for a message that left the network at
/// `exit_ms`, given every packet that entered (`entries`), `fixed_ms` of link latency on the
/// path, and `k` delaying hops of mean `mean_ms`. Weights per sender (length `population`),
/// normalised to sum 1 (all zero when no entry explains the exit).
pub fn timing_distribution(
    entries: &[Entry],
    exit_ms: f64,
    fixed_ms: f64,
    k: u32,
    mean_ms: f64,
    population: usize,
    tolerance_ms: f64,
) -> Vec<f64> {
    let mut w = vec![0.0; population];
    for e in entries {
        let delay = exit_ms - e.at_ms - fixed_ms;
        if let Some(slot) = w.get_mut(e.sender) {
            *slot += erlang_pdf(k, mean_ms, delay, tolerance_ms);
        }
    }
    let total: f64 = w.iter().sum();
    if total > 0.0 {
        for x in &mut w {
            *x /= total;
        }
    }
    w
}

/// The timing-correlation attack: the most likely sender (the lowest index among ties), or
/// `None` when nothing explains the message.
pub fn best_guess(weights: &[f64]) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for (i, w) in weights.iter().enumerate() {
        if *w > 0.0 && best.is_none_or(|(_, b)| *w > b) {
            best = Some((i, *w));
        }
    }
    best.map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};

    #[test]
    fn entropy_matches_the_closed_forms() {
        // Uniform over N: log2 N; certain: 0; (1/2, 1/4, 1/4): 1.5 bits.
        for n in [1usize, 2, 8, 1000] {
            let h = entropy_bits(&vec![1.0; n]);
            assert!((h - (n as f64).log2()).abs() < 1e-9, "{n}: {h}");
        }
        assert_eq!(entropy_bits(&[0.0, 5.0, 0.0]), 0.0);
        assert!((entropy_bits(&[0.5, 0.25, 0.25]) - 1.5).abs() < 1e-12);
        assert_eq!(entropy_bits(&[]), 0.0);
        assert_eq!(entropy_bits(&[f64::NAN, -1.0]), 0.0);
        let a = anonymity(&[1.0; 16], 16);
        assert!((a.anonymity_set - 16.0).abs() < 1e-9);
        assert!((a.normalised_degree - 1.0).abs() < 1e-12);
        let a = anonymity(&[1.0; 4], 16);
        assert!((a.normalised_degree - 0.5).abs() < 1e-12);
    }

    #[test]
    fn erlang_density_integrates_to_one_with_mean_k_mu() {
        for (k, mean) in [(1u32, 50.0), (3, 20.0), (5, 100.0)] {
            let step = 0.05;
            let (mut area, mut first) = (0.0, 0.0);
            let mut x = step / 2.0;
            while x < mean * f64::from(k) * 20.0 {
                let p = erlang_pdf(k, mean, x, 0.0);
                area += p * step;
                first += x * p * step;
                x += step;
            }
            assert!((area - 1.0).abs() < 1e-3, "k={k}: area {area}");
            let expected = f64::from(k) * mean;
            assert!(
                (first - expected).abs() / expected < 1e-3,
                "k={k}: mean {first}"
            );
        }
        assert_eq!(erlang_pdf(2, 10.0, -1.0, 0.0), 0.0);
    }

    #[test]
    fn one_message_in_flight_without_mixing_has_entropy_zero() {
        // Mixing off: the delay is exactly the link latency; only the real sender's packet
        // explains the exit; the others entered at other times.
        let entries = [
            Entry {
                sender: 0,
                at_ms: 0.0,
            },
            Entry {
                sender: 1,
                at_ms: 500.0,
            },
            Entry {
                sender: 2,
                at_ms: 900.0,
            },
        ];
        let w = timing_distribution(&entries, 530.0, 30.0, 0, 0.0, 3, 0.5);
        assert_eq!(entropy_bits(&w), 0.0);
        assert_eq!(best_guess(&w), Some(1));
    }

    /// With N senders sending at random times, entropy grows with the mean delay (more
    /// candidates stay plausible) and with the traffic rate (more candidates per window).
    #[test]
    fn entropy_grows_with_the_mean_delay_and_with_the_rate() {
        let run = |mean: f64, per_second: f64| {
            let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(7);
            let n = 50;
            let span = 60_000.0;
            let count = (per_second * span / 1000.0) as usize;
            let entries: Vec<Entry> = (0..count)
                .map(|_| Entry {
                    sender: rng.random_range(0..n),
                    at_ms: rng.random_range(0.0..span),
                })
                .collect();
            // Average over messages whose true delay is drawn from the model.
            let mut total = 0.0;
            let probes = 200;
            for i in 0..probes {
                let e = entries[i * entries.len() / probes];
                let delay: f64 = (0..3)
                    .map(|_| -rng.random_range(f64::MIN_POSITIVE..1.0f64).ln() * mean)
                    .sum();
                let w = timing_distribution(&entries, e.at_ms + delay, 0.0, 3, mean, n, 0.0);
                total += entropy_bits(&w);
            }
            total / probes as f64
        };
        let (short, long) = (run(20.0, 5.0), run(200.0, 5.0));
        assert!(long > short + 0.5, "delay: {short} → {long}");
        let (sparse, dense) = (run(50.0, 1.0), run(50.0, 20.0));
        assert!(dense > sparse + 0.5, "rate: {sparse} → {dense}");
        assert!(dense <= (50f64).log2() + 1e-9);
    }
}
