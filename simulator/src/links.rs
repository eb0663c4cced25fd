//! Links between simulated nodes: latency distributions (constant, uniform, log-normal, or a
//! per-pair matrix read from CSV), bandwidth, loss, and partitions over time windows. Every
//! random draw comes from a stream of the run's [`crate::engine::RngTree`], so a run is
//! reproducible from its seed.

use std::time::Duration;

use rand::RngExt;

/// Why a link description was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// A parameter is out of range.
    #[error("{0}")]
    Invalid(&'static str),
    /// The latency matrix CSV is malformed.
    #[error("latency matrix, line {line}: {reason}")]
    Csv {
        /// 1-based line.
        line: usize,
        /// What is wrong.
        reason: &'static str,
    },
}

/// One-way latency of a link.
#[derive(Clone, Debug, PartialEq)]
pub enum Latency {
    /// Always this many ms.
    Constant(f64),
    /// Uniform in `[min, max]` ms.
    Uniform {
        /// Lower bound, ms.
        min: f64,
        /// Upper bound, ms.
        max: f64,
    },
    /// Log-normal: `ln(latency in ms)` is normal with mean `ln(median)` and std. dev. `sigma`.
    LogNormal {
        /// Median, ms.
        median: f64,
        /// Standard deviation of the logarithm.
        sigma: f64,
    },
    /// `matrix[from][to]` ms (from a measured CSV matrix), by node index modulo its size.
    Matrix(Vec<Vec<f64>>),
}

impl Latency {
    /// Checks the parameters.
    pub fn validate(&self) -> Result<(), LinkError> {
        let ok = |x: f64| x.is_finite() && x >= 0.0;
        match self {
            Latency::Constant(ms) if ok(*ms) => Ok(()),
            Latency::Uniform { min, max } if ok(*min) && ok(*max) && min <= max => Ok(()),
            Latency::LogNormal { median, sigma } if ok(*median) && *median > 0.0 && ok(*sigma) => {
                Ok(())
            }
            Latency::Matrix(m)
                if !m.is_empty()
                    && m.iter()
                        .all(|row| row.len() == m.len() && row.iter().all(|x| ok(*x))) =>
            {
                Ok(())
            }
            Latency::Constant(_) => Err(LinkError::Invalid("constant latency must be ≥ 0 ms")),
            Latency::Uniform { .. } => {
                Err(LinkError::Invalid("uniform latency needs 0 ≤ min ≤ max"))
            }
            Latency::LogNormal { .. } => Err(LinkError::Invalid(
                "log-normal latency needs median > 0 and sigma ≥ 0",
            )),
            Latency::Matrix(_) => Err(LinkError::Invalid(
                "a latency matrix must be square, non-empty, with finite values ≥ 0",
            )),
        }
    }

    /// Draws the latency of one packet from node `from` to node `to`.
    pub fn sample<R: rand::Rng + ?Sized>(&self, rng: &mut R, from: usize, to: usize) -> Duration {
        let ms = match self {
            Latency::Constant(ms) => *ms,
            Latency::Uniform { min, max } => {
                if max > min {
                    rng.random_range(*min..=*max)
                } else {
                    *min
                }
            }
            Latency::LogNormal { median, sigma } => {
                // Box–Muller: one standard normal from two uniforms.
                let u1: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
                let u2: f64 = rng.random_range(0.0..1.0);
                let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                (median.ln() + sigma * z).exp()
            }
            Latency::Matrix(m) => {
                let n = m.len().max(1);
                m.get(from % n)
                    .and_then(|row| row.get(to % n))
                    .copied()
                    .unwrap_or(0.0)
            }
        };
        Duration::from_secs_f64((ms / 1000.0).clamp(0.0, 86_400.0))
    }
}

/// Parses a square latency matrix: one row per line, values in ms separated by commas; blank
/// lines and lines starting with `#` are skipped.
pub fn parse_matrix(text: &str) -> Result<Latency, LinkError> {
    let mut rows: Vec<Vec<f64>> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let row: Result<Vec<f64>, LinkError> = line
            .split(',')
            .map(|v| {
                v.trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|x| x.is_finite() && *x >= 0.0)
                    .ok_or(LinkError::Csv {
                        line: i + 1,
                        reason: "not a latency in ms (a finite number ≥ 0)",
                    })
            })
            .collect();
        rows.push(row?);
    }
    let m = Latency::Matrix(rows);
    m.validate().map_err(|_| LinkError::Csv {
        line: 0,
        reason: "the matrix is empty or not square",
    })?;
    Ok(m)
}

/// A directed link's properties.
#[derive(Clone, Debug, PartialEq)]
pub struct Link {
    /// Propagation latency.
    pub latency: Latency,
    /// Bytes per second (0: unlimited).
    pub bandwidth_bps: u64,
    /// Probability that a packet is lost, in `[0, 1]`.
    pub loss: f64,
}

impl Link {
    /// Checks the parameters.
    pub fn validate(&self) -> Result<(), LinkError> {
        self.latency.validate()?;
        if !(0.0..=1.0).contains(&self.loss) {
            return Err(LinkError::Invalid("loss must be within [0, 1]"));
        }
        Ok(())
    }

    /// Time to put `bytes` on the wire at the link's bandwidth.
    pub fn serialisation(&self, bytes: usize) -> Duration {
        if self.bandwidth_bps == 0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(bytes as f64 / self.bandwidth_bps as f64)
    }

    /// One packet of `bytes` from `from` to `to`: its delay, or `None` if it is lost.
    pub fn transmit<R: rand::Rng + ?Sized>(
        &self,
        rng: &mut R,
        from: usize,
        to: usize,
        bytes: usize,
    ) -> Option<Duration> {
        if self.loss > 0.0 && rng.random_range(0.0..1.0) < self.loss {
            return None;
        }
        Some(self.latency.sample(rng, from, to) + self.serialisation(bytes))
    }
}

/// A network partition: during `[start, end)` (simulated ms), nodes in different groups
/// cannot reach each other; nodes in no group reach everyone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    /// Start, ms.
    pub start_ms: u64,
    /// End, ms.
    pub end_ms: u64,
    /// Disjoint groups of node indices.
    pub groups: Vec<Vec<usize>>,
}

impl Partition {
    /// True if this partition separates `a` from `b` at `t_ms`.
    pub fn separates(&self, a: usize, b: usize, t_ms: u64) -> bool {
        if t_ms < self.start_ms || t_ms >= self.end_ms {
            return false;
        }
        let group = |n: usize| self.groups.iter().position(|g| g.contains(&n));
        match (group(a), group(b)) {
            (Some(x), Some(y)) => x != y,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::RngTree;

    fn ms(d: Duration) -> f64 {
        d.as_secs_f64() * 1000.0
    }

    #[test]
    fn distributions_have_their_analytical_moments() {
        let n = 20_000;
        let mut rng = RngTree::new(1).stream("links", 0);
        // Uniform [10, 30]: mean 20, sd 20/√12; tolerance 5 standard errors.
        let u = Latency::Uniform {
            min: 10.0,
            max: 30.0,
        };
        let xs: Vec<f64> = (0..n).map(|_| ms(u.sample(&mut rng, 0, 1))).collect();
        assert!(xs.iter().all(|x| (10.0..=30.0).contains(x)));
        let mean = xs.iter().sum::<f64>() / n as f64;
        let se = 20.0 / 12f64.sqrt() / (n as f64).sqrt();
        assert!((mean - 20.0).abs() < 5.0 * se, "uniform mean {mean}");
        // Log-normal: the median is exp(μ); P(X < median) = 1/2 (binomial sd 1/(2√n)).
        let l = Latency::LogNormal {
            median: 40.0,
            sigma: 0.5,
        };
        let below = (0..n)
            .filter(|_| ms(l.sample(&mut rng, 0, 1)) < 40.0)
            .count() as f64
            / n as f64;
        assert!(
            (below - 0.5).abs() < 5.0 * 0.5 / (n as f64).sqrt(),
            "{below}"
        );
        // Constant is exact.
        assert_eq!(
            Latency::Constant(7.5).sample(&mut rng, 3, 4),
            Duration::from_micros(7500)
        );
    }

    #[test]
    fn loss_follows_its_probability_and_delays_add_serialisation() {
        let mut rng = RngTree::new(2).stream("links", 0);
        let link = Link {
            latency: Latency::Constant(10.0),
            bandwidth_bps: 1_000_000,
            loss: 0.2,
        };
        link.validate().unwrap();
        let n = 20_000;
        let results: Vec<Option<Duration>> = (0..n)
            .map(|_| link.transmit(&mut rng, 0, 1, 2396))
            .collect();
        let lost = results.iter().filter(|r| r.is_none()).count() as f64 / n as f64;
        let sd = (0.2f64 * 0.8 / n as f64).sqrt();
        assert!((lost - 0.2).abs() < 5.0 * sd, "loss {lost}");
        let d = results.iter().flatten().next().unwrap();
        assert!((ms(*d) - (10.0 + 2.396)).abs() < 1e-6);
        assert!(
            Link {
                loss: 1.5,
                ..link.clone()
            }
            .validate()
            .is_err()
        );
    }

    #[test]
    fn matrices_parse_or_say_why_not() {
        let m = parse_matrix("# from\\to\n0, 12.5\n 30 ,0\n\n").unwrap();
        let mut rng = RngTree::new(3).stream("links", 0);
        assert_eq!(ms(m.sample(&mut rng, 0, 1)), 12.5);
        assert_eq!(ms(m.sample(&mut rng, 1, 0)), 30.0);
        assert_eq!(ms(m.sample(&mut rng, 3, 2)), 30.0, "indices wrap around");
        assert!(matches!(
            parse_matrix("0,1\n1,x\n"),
            Err(LinkError::Csv { line: 2, .. })
        ));
        assert!(parse_matrix("0,1\n1\n").is_err());
        assert!(parse_matrix("").is_err());
        assert!(parse_matrix("0,-1\n1,0").is_err());
        assert!(Latency::Uniform { min: 5.0, max: 1.0 }.validate().is_err());
    }

    #[test]
    fn partitions_separate_groups_only_within_their_window() {
        let p = Partition {
            start_ms: 1000,
            end_ms: 2000,
            groups: vec![vec![0, 1], vec![2]],
        };
        assert!(p.separates(0, 2, 1500));
        assert!(!p.separates(0, 1, 1500));
        assert!(!p.separates(0, 2, 999));
        assert!(!p.separates(0, 2, 2000));
        assert!(
            !p.separates(0, 3, 1500),
            "a node in no group reaches everyone"
        );
    }
}
