//! The audit log: a hash-chained, append-only JSON-lines record of administrative actions on
//! the timer node (pause, resume, quarantine, release, purge, verify).
//!
//! # Format
//!
//! One entry per line, every line ending in `\n`, at most [`LINE_MAX`] bytes before it:
//!
//! ```text
//! {"seq":1,"at_ms":1800000000000,"actor":"admin-api","action":"pause","category":"expiry","task":null,"count":null,"prev":"0000…0000","hash":"…"}
//! ```
//!
//! The members are always these nine, in this order, with no whitespace:
//!
//! * `seq` — 1 for the first entry, then consecutive;
//! * `at_ms` — Unix milliseconds;
//! * `actor` — who acted, 1 to [`ACTOR_MAX`] bytes (e.g. `"admin-api"`);
//! * `action` — one of [`AuditAction::name`];
//! * `category` — a [`Category::name`] or `null`;
//! * `task` — a task id as 32 lowercase hex digits, or `null`;
//! * `count` — an unsigned integer (e.g. how many tasks a purge removed) or `null`;
//! * `prev` — the previous entry's `hash`, 64 zeros for the first entry;
//! * `hash` — 64 lowercase hex digits of `SHA-256("whispr-audit-v1\n" ‖ U)`, where `U` is
//!   the entry's JSON text *without* the `hash` member: the line with its trailing
//!   `,"hash":"<64 hex>"` removed, i.e. `{"seq":…,…,"prev":"…"}`.
//!
//! The text is exactly what `serde_json::to_string` produces for a struct with these fields in
//! this order (compact; strings escaped the serde_json way: `\"`, `\\`, `\n`, `\r`, `\t`,
//! `\b`, `\f`, other control characters as `\u00xx`, everything else as raw UTF-8). A line that
//! decodes to valid values but is not in exactly that form counts as edited.
//!
//! No payload, owner tag or token ever goes into the log: an entry holds only the fields above.
//!
//! # Guarantees and limits
//!
//! Editing, removing, inserting or reordering any line breaks the chain at the first line
//! concerned, and [`verify`] reports that line. Removing lines *at the end* leaves a shorter
//! chain that is valid on its own; only an anchor (the last `(seq, hash)` the node has seen,
//! kept somewhere else) reveals it. The chain is not keyed: whoever can write the file can also
//! rewrite it entirely with fresh hashes; again only an anchor kept elsewhere detects that.
//!
//! [`AuditLog::open`] refuses a log that does not verify, including one whose last line was
//! cut short by a crash in the middle of a write: the node must not keep appending to a log it
//! cannot vouch for, so an operator has to look at it first.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use whispr_protocol::UnixTime;

use crate::error::{Result, TimerError};
use crate::task::{Category, TaskId};

/// Domain separation prefix hashed in front of every entry.
pub const HASH_DOMAIN: &[u8] = b"whispr-audit-v1\n";
/// The longest line accepted, in bytes, not counting its `\n`.
pub const LINE_MAX: usize = 4096;
/// The longest `actor` accepted, in bytes.
pub const ACTOR_MAX: usize = 64;
/// The `prev` of the first entry (and the hash of the empty log's tip).
pub const GENESIS: [u8; 32] = [0u8; 32];

/// An administrative action worth recording.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AuditAction {
    /// A category (or the whole node) stopped firing.
    Pause,
    /// A paused category fires again.
    Resume,
    /// A task was taken out of circulation.
    Quarantine,
    /// A quarantined task was put back.
    Release,
    /// Tasks were deleted (`count` says how many).
    Purge,
    /// The audit log itself was verified.
    Verify,
    /// Queue statistics were read through the admin API.
    Stats,
    /// The record of recently fired tasks was read through the admin API.
    Fired,
    /// An online backup was asked for through the admin API.
    Backup,
}

impl AuditAction {
    /// Every action.
    pub const ALL: [AuditAction; 9] = [
        AuditAction::Pause,
        AuditAction::Resume,
        AuditAction::Quarantine,
        AuditAction::Release,
        AuditAction::Purge,
        AuditAction::Verify,
        AuditAction::Stats,
        AuditAction::Fired,
        AuditAction::Backup,
    ];

    /// The name written in the log's `action` member.
    pub fn name(self) -> &'static str {
        match self {
            AuditAction::Pause => "pause",
            AuditAction::Resume => "resume",
            AuditAction::Quarantine => "quarantine",
            AuditAction::Release => "release",
            AuditAction::Purge => "purge",
            AuditAction::Verify => "verify",
            AuditAction::Stats => "stats",
            AuditAction::Fired => "fired",
            AuditAction::Backup => "backup",
        }
    }

    /// The action called `name`, if any.
    pub fn parse(name: &str) -> Option<AuditAction> {
        AuditAction::ALL.into_iter().find(|a| a.name() == name)
    }
}

impl fmt::Display for AuditAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One entry of the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditEntry {
    /// Position in the chain, from 1.
    pub seq: u64,
    /// When the action happened.
    pub at: UnixTime,
    /// Who acted.
    pub actor: String,
    /// What was done.
    pub action: AuditAction,
    /// The category concerned, if any.
    pub category: Option<Category>,
    /// The task concerned, if any.
    pub task: Option<TaskId>,
    /// A count (e.g. tasks purged), if any.
    pub count: Option<u64>,
    /// The previous entry's hash ([`GENESIS`] for the first).
    pub prev: [u8; 32],
    /// This entry's hash (see the module documentation).
    pub hash: [u8; 32],
}

/// The members of a line but `hash`, in line order: serialised, this is the hashed text `U`.
#[derive(Serialize)]
struct UnsignedLine<'a> {
    seq: u64,
    at_ms: u64,
    actor: &'a str,
    action: &'a str,
    category: Option<&'a str>,
    task: Option<&'a str>,
    count: Option<u64>,
    prev: &'a str,
}

/// A whole line as text fields, in line order.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    seq: u64,
    at_ms: u64,
    actor: String,
    action: String,
    category: Option<String>,
    task: Option<String>,
    count: Option<u64>,
    prev: String,
    hash: String,
}

impl Line {
    fn unsigned(&self) -> UnsignedLine<'_> {
        UnsignedLine {
            seq: self.seq,
            at_ms: self.at_ms,
            actor: &self.actor,
            action: &self.action,
            category: self.category.as_deref(),
            task: self.task.as_deref(),
            count: self.count,
            prev: &self.prev,
        }
    }
}

fn to_json<T: Serialize>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|e| TimerError::Audit(format!("serialising: {e}")))
}

fn hash_text(unsigned_json: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(HASH_DOMAIN);
    h.update(unsigned_json.as_bytes());
    h.finalize().into()
}

impl AuditEntry {
    fn to_text(&self) -> Line {
        Line {
            seq: self.seq,
            at_ms: self.at.as_millis(),
            actor: self.actor.clone(),
            action: self.action.name().to_owned(),
            category: self.category.map(|c| c.name().to_owned()),
            task: self.task.map(|t| t.to_string()),
            count: self.count,
            prev: hex::encode(self.prev),
            hash: hex::encode(self.hash),
        }
    }

    /// The exact text that is hashed after [`HASH_DOMAIN`]: the entry's JSON without `hash`.
    pub fn unsigned_json(&self) -> Result<String> {
        to_json(&self.to_text().unsigned())
    }

    /// The hash this entry must carry, computed from its other fields.
    pub fn compute_hash(&self) -> Result<[u8; 32]> {
        Ok(hash_text(&self.unsigned_json()?))
    }

    /// The entry's line as written to the file, without its `\n`.
    pub fn to_line(&self) -> Result<String> {
        to_json(&self.to_text())
    }
}

/// What is wrong with a log.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProblemKind {
    /// A line longer than [`LINE_MAX`] bytes.
    LineTooLong,
    /// The file does not end in `\n`: its last line is incomplete.
    TruncatedLastLine,
    /// Not UTF-8, not JSON, missing or unknown members, or a value out of range.
    Malformed(String),
    /// Valid values, but not in the exact form the log writes: the line was edited.
    NotCanonical,
    /// The line's `hash` does not match its content: the line was edited.
    HashMismatch,
    /// `seq` jumps forward and the missing entries appear nowhere later: lines were removed.
    Missing {
        /// The `seq` this line should have.
        expected: u64,
        /// The `seq` it has.
        found: u64,
    },
    /// `seq` is not the next one, but the expected entry is elsewhere in the file (or the
    /// `seq` goes backwards): lines were reordered or duplicated.
    OutOfOrder {
        /// The `seq` this line should have.
        expected: u64,
        /// The `seq` it has.
        found: u64,
    },
    /// The right `seq`, but `prev` is not the previous entry's hash: an entry was replaced.
    BrokenLink,
    /// The log ends before the anchor's `seq`: lines were removed at the end.
    EndsBeforeAnchor {
        /// The anchor's `seq`.
        anchor_seq: u64,
        /// The last `seq` in the file (0 if empty).
        last_seq: u64,
    },
    /// The entry at the anchor's `seq` has another hash: the log was rewritten.
    AnchorMismatch {
        /// The anchor's `seq`.
        anchor_seq: u64,
    },
}

impl fmt::Display for ProblemKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProblemKind::LineTooLong => write!(f, "line longer than {LINE_MAX} bytes"),
            ProblemKind::TruncatedLastLine => f.write_str("last line is truncated (no newline)"),
            ProblemKind::Malformed(why) => write!(f, "malformed entry: {why}"),
            ProblemKind::NotCanonical => f.write_str("entry is not in canonical form (edited)"),
            ProblemKind::HashMismatch => f.write_str("hash does not match the entry (edited)"),
            ProblemKind::Missing { expected, found } => write!(
                f,
                "seq {found} where {expected} was expected: entries removed"
            ),
            ProblemKind::OutOfOrder { expected, found } => write!(
                f,
                "seq {found} where {expected} was expected: entries reordered or duplicated"
            ),
            ProblemKind::BrokenLink => {
                f.write_str("prev does not match the previous entry's hash (entry replaced)")
            }
            ProblemKind::EndsBeforeAnchor {
                anchor_seq,
                last_seq,
            } => write!(
                f,
                "log ends at seq {last_seq}, before the anchor's seq {anchor_seq}: entries removed at the end"
            ),
            ProblemKind::AnchorMismatch { anchor_seq } => write!(
                f,
                "entry {anchor_seq} does not have the anchor's hash: log rewritten"
            ),
        }
    }
}

/// The first problem found, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The 1-based line number concerned. For [`ProblemKind::EndsBeforeAnchor`], the line
    /// right after the last one (where the next expected entry is missing).
    pub line: u64,
    /// What is wrong.
    pub kind: ProblemKind,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.kind)
    }
}

/// The outcome of [`verify`].
///
/// Serialises (for the admin API) as
/// `{"ok":false,"entries":2,"tip_seq":2,"tip_hash":"<64 hex>","problem":{"line":3,"kind":"hash_mismatch","detail":"…"}}`,
/// with `"problem":null` when `ok`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyReport {
    /// True when the whole log verified (and matched the anchor, if one was given); the same
    /// as `problem.is_none()`.
    pub ok: bool,
    /// Entries that verified (all of them when [`VerifyReport::is_ok`], otherwise those before
    /// the problem).
    pub entries: u64,
    /// `(seq, hash)` of the last entry that verified; `(0, GENESIS)` if none.
    pub tip: (u64, [u8; 32]),
    /// The first problem, if any.
    pub problem: Option<Problem>,
}

impl VerifyReport {
    /// True when the whole log verified (and matched the anchor, if one was given).
    pub fn is_ok(&self) -> bool {
        self.ok && self.problem.is_none()
    }

    /// One line for people: `ok: N entries, tip seq S <hash>` or `line L: <problem>`.
    pub fn describe(&self) -> String {
        match &self.problem {
            None => format!(
                "ok: {} entries, tip seq {} {}",
                self.entries,
                self.tip.0,
                hex::encode(self.tip.1)
            ),
            Some(problem) => problem.to_string(),
        }
    }
}

impl ProblemKind {
    /// A stable snake_case name for the kind of problem (used in the JSON report).
    pub fn name(&self) -> &'static str {
        match self {
            ProblemKind::LineTooLong => "line_too_long",
            ProblemKind::TruncatedLastLine => "truncated_last_line",
            ProblemKind::Malformed(_) => "malformed",
            ProblemKind::NotCanonical => "not_canonical",
            ProblemKind::HashMismatch => "hash_mismatch",
            ProblemKind::Missing { .. } => "missing",
            ProblemKind::OutOfOrder { .. } => "out_of_order",
            ProblemKind::BrokenLink => "broken_link",
            ProblemKind::EndsBeforeAnchor { .. } => "ends_before_anchor",
            ProblemKind::AnchorMismatch { .. } => "anchor_mismatch",
        }
    }
}

#[derive(Serialize)]
struct ProblemJson {
    line: u64,
    kind: &'static str,
    detail: String,
}

#[derive(Serialize)]
struct ReportJson {
    ok: bool,
    entries: u64,
    tip_seq: u64,
    tip_hash: String,
    problem: Option<ProblemJson>,
}

impl Serialize for VerifyReport {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        ReportJson {
            ok: self.is_ok(),
            entries: self.entries,
            tip_seq: self.tip.0,
            tip_hash: hex::encode(self.tip.1),
            problem: self.problem.as_ref().map(|p| ProblemJson {
                line: p.line,
                kind: p.kind.name(),
                detail: p.kind.to_string(),
            }),
        }
        .serialize(serializer)
    }
}

fn io_error(what: &str, e: &io::Error) -> TimerError {
    TimerError::Audit(format!("{what}: {e}"))
}

/// A line read with a bound on its length.
enum RawLine {
    /// A complete line, its `\n` removed.
    Complete,
    /// More than [`LINE_MAX`] bytes without a `\n`.
    TooLong,
    /// End of file in the middle of a line.
    Truncated,
    /// End of file.
    Eof,
}

/// Reads the next line into `buf` (cleared first), never more than `LINE_MAX + 1` bytes.
fn next_line<R: BufRead>(reader: &mut R, buf: &mut Vec<u8>) -> io::Result<RawLine> {
    buf.clear();
    let limit = u64::try_from(LINE_MAX)
        .unwrap_or(u64::MAX)
        .saturating_add(1);
    let n = reader.by_ref().take(limit).read_until(b'\n', buf)?;
    if n == 0 {
        return Ok(RawLine::Eof);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
        return Ok(RawLine::Complete);
    }
    if buf.len() > LINE_MAX {
        Ok(RawLine::TooLong)
    } else {
        Ok(RawLine::Truncated)
    }
}

fn decode_hash(text: &str, what: &str) -> std::result::Result<[u8; 32], ProblemKind> {
    let mut out = [0u8; 32];
    let lower = text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if !lower || hex::decode_to_slice(text, &mut out).is_err() {
        return Err(ProblemKind::Malformed(format!(
            "{what} is not 64 lowercase hex digits"
        )));
    }
    Ok(out)
}

/// Parses one line (without its `\n`) and checks it on its own: form, values, hash.
fn parse_line(bytes: &[u8]) -> std::result::Result<AuditEntry, ProblemKind> {
    let text =
        std::str::from_utf8(bytes).map_err(|_| ProblemKind::Malformed("not UTF-8".to_owned()))?;
    let line: Line =
        serde_json::from_str(text).map_err(|e| ProblemKind::Malformed(e.to_string()))?;
    let malformed = |why: &str| ProblemKind::Malformed(why.to_owned());
    if line.actor.is_empty() || line.actor.len() > ACTOR_MAX {
        return Err(malformed("actor is empty or too long"));
    }
    let action = AuditAction::parse(&line.action).ok_or_else(|| malformed("unknown action"))?;
    let category = match &line.category {
        None => None,
        Some(name) => Some(Category::parse(name).map_err(|_| malformed("unknown category"))?),
    };
    let task = match &line.task {
        None => None,
        Some(id) => {
            let lower = id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
            if !lower {
                return Err(malformed("task is not 32 lowercase hex digits"));
            }
            Some(TaskId::parse(id).map_err(|_| malformed("task is not 32 lowercase hex digits"))?)
        }
    };
    let prev = decode_hash(&line.prev, "prev")?;
    let hash = decode_hash(&line.hash, "hash")?;
    let canonical =
        serde_json::to_string(&line).map_err(|e| ProblemKind::Malformed(e.to_string()))?;
    if canonical != text {
        return Err(ProblemKind::NotCanonical);
    }
    let unsigned = serde_json::to_string(&line.unsigned())
        .map_err(|e| ProblemKind::Malformed(e.to_string()))?;
    if hash_text(&unsigned) != hash {
        return Err(ProblemKind::HashMismatch);
    }
    Ok(AuditEntry {
        seq: line.seq,
        at: UnixTime(line.at_ms),
        actor: line.actor,
        action,
        category,
        task,
        count: line.count,
        prev,
        hash,
    })
}

/// After a forward `seq` jump: does the expected `seq` appear later in the file?
fn appears_later<R: BufRead>(reader: &mut R, buf: &mut Vec<u8>, wanted: u64) -> io::Result<bool> {
    loop {
        match next_line(reader, buf)? {
            RawLine::Complete => {
                if parse_line(buf).is_ok_and(|e| e.seq == wanted) {
                    return Ok(true);
                }
            }
            RawLine::TooLong | RawLine::Truncated | RawLine::Eof => return Ok(false),
        }
    }
}

/// Verifies a whole log read from `reader`; `Err` only for read errors.
fn verify_reader<R: BufRead>(
    reader: &mut R,
    anchor: Option<(u64, [u8; 32])>,
) -> Result<VerifyReport> {
    let mut buf = Vec::with_capacity(512);
    let mut tip: (u64, [u8; 32]) = (0, GENESIS);
    let mut line_no: u64 = 0;
    // The hash found at the anchor's seq, once reached (seq 0 is the genesis).
    let mut at_anchor: Option<[u8; 32]> = match anchor {
        Some((0, _)) => Some(GENESIS),
        _ => None,
    };
    let fail = |tip: (u64, [u8; 32]), line: u64, kind: ProblemKind| {
        Ok(VerifyReport {
            ok: false,
            entries: tip.0,
            tip,
            problem: Some(Problem { line, kind }),
        })
    };
    loop {
        let raw = next_line(reader, &mut buf).map_err(|e| io_error("reading", &e))?;
        line_no = line_no.saturating_add(1);
        match raw {
            RawLine::Eof => break,
            RawLine::TooLong => return fail(tip, line_no, ProblemKind::LineTooLong),
            RawLine::Truncated => return fail(tip, line_no, ProblemKind::TruncatedLastLine),
            RawLine::Complete => {}
        }
        let entry = match parse_line(&buf) {
            Ok(entry) => entry,
            Err(kind) => return fail(tip, line_no, kind),
        };
        let Some(expected) = tip.0.checked_add(1) else {
            return fail(
                tip,
                line_no,
                ProblemKind::Malformed("seq overflow".to_owned()),
            );
        };
        if entry.seq != expected {
            let found = entry.seq;
            let later = entry.seq > expected
                && appears_later(reader, &mut buf, expected)
                    .map_err(|e| io_error("reading", &e))?;
            let kind = if entry.seq > expected && !later {
                ProblemKind::Missing { expected, found }
            } else {
                ProblemKind::OutOfOrder { expected, found }
            };
            return fail(tip, line_no, kind);
        }
        if entry.prev != tip.1 {
            return fail(tip, line_no, ProblemKind::BrokenLink);
        }
        tip = (entry.seq, entry.hash);
        if anchor.is_some_and(|(seq, _)| seq == entry.seq) {
            at_anchor = Some(entry.hash);
        }
    }
    if let Some((anchor_seq, anchor_hash)) = anchor {
        match at_anchor {
            None => {
                return fail(
                    tip,
                    line_no,
                    ProblemKind::EndsBeforeAnchor {
                        anchor_seq,
                        last_seq: tip.0,
                    },
                );
            }
            Some(hash) if hash != anchor_hash => {
                // For seq n ≥ 1 the entry sits on line n; seq 0 is before the first line.
                return fail(tip, anchor_seq, ProblemKind::AnchorMismatch { anchor_seq });
            }
            Some(_) => {}
        }
    }
    Ok(VerifyReport {
        ok: true,
        entries: tip.0,
        tip,
        problem: None,
    })
}

/// Verifies the log at `path`: every line's form and hash, consecutive `seq` from 1, every
/// `prev` link and, with an `anchor` (a `(seq, hash)` the node recorded earlier, kept outside
/// the log), that the log still reaches that `seq` with that hash.
///
/// Problems with the content are reported in the [`VerifyReport`] (the first one only);
/// `Err` means the file could not be read. A missing file counts as an empty log (so it
/// verifies without an anchor, and fails with [`ProblemKind::EndsBeforeAnchor`] with one). Never panics, whatever the file holds; reads at
/// most [`LINE_MAX`]` + 1` bytes per line into memory.
pub fn verify(path: &Path, anchor: Option<(u64, [u8; 32])>) -> Result<VerifyReport> {
    let file = match File::open(path) {
        Ok(file) => file,
        // No file is an empty log: fine on first start, `EndsBeforeAnchor` after a deletion.
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return verify_reader(&mut io::empty(), anchor);
        }
        Err(e) => return Err(io_error("opening", &e)),
    };
    check_regular(&file)?;
    verify_reader(&mut BufReader::new(file), anchor)
}

fn check_regular(file: &File) -> Result<()> {
    let meta = file.metadata().map_err(|e| io_error("stat", &e))?;
    if meta.is_file() {
        Ok(())
    } else {
        Err(TimerError::Audit("not a regular file".to_owned()))
    }
}

/// An open audit log, ready to append. Holds an exclusive advisory lock on the file for as
/// long as it lives, so that two writers cannot fork the chain.
#[derive(Debug)]
pub struct AuditLog {
    file: File,
    /// `(seq, hash)` of the last entry; `(0, GENESIS)` when empty.
    tip: (u64, [u8; 32]),
    /// The file's length after the last entry, to roll a failed append back.
    len: u64,
    /// An append failed: refuse further appends (the file may hold half a line).
    poisoned: bool,
}

impl AuditLog {
    /// Opens the log at `path`, creating it (mode 0600) if absent. An existing log is verified
    /// in full first: one that does not verify is refused with [`TimerError::Audit`], as is
    /// a log another [`AuditLog`] holds open.
    pub fn open(path: &Path) -> Result<AuditLog> {
        AuditLog::open_anchored(path, None)
    }

    /// [`AuditLog::open`], and also refuses the log unless it reaches `anchor` (a `(seq, hash)`
    /// recorded earlier outside the log): this catches entries removed at the end.
    pub fn open_anchored(path: &Path, anchor: Option<(u64, [u8; 32])>) -> Result<AuditLog> {
        let mut options = OpenOptions::new();
        options.read(true).append(true).create(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let file = options.open(path).map_err(|e| io_error("opening", &e))?;
        check_regular(&file)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(TimerError::Audit(
                    "log is already open for writing elsewhere".to_owned(),
                ));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io_error("locking", &e)),
        }
        let report = verify_reader(&mut BufReader::new(&file), anchor)?;
        if let Some(problem) = report.problem {
            return Err(TimerError::Audit(format!(
                "refusing a log that does not verify: {problem}"
            )));
        }
        let len = file.metadata().map_err(|e| io_error("stat", &e))?.len();
        Ok(AuditLog {
            file,
            tip: report.tip,
            len,
            poisoned: false,
        })
    }

    /// `(seq, hash)` of the last entry, `(0, GENESIS)` for an empty log. Keep it somewhere
    /// else to use as [`verify`]'s anchor.
    pub fn tip(&self) -> (u64, [u8; 32]) {
        self.tip
    }

    /// Appends an entry and syncs it to disk before returning it.
    ///
    /// `actor` must be 1 to [`ACTOR_MAX`] bytes. After a failed write or sync the log tries
    /// to cut the partial line off and then refuses further appends; reopen it.
    pub fn append(
        &mut self,
        at: UnixTime,
        actor: &str,
        action: AuditAction,
        category: Option<Category>,
        task: Option<TaskId>,
        count: Option<u64>,
    ) -> Result<AuditEntry> {
        if self.poisoned {
            return Err(TimerError::Audit(
                "an earlier append failed; reopen the log".to_owned(),
            ));
        }
        if actor.is_empty() || actor.len() > ACTOR_MAX {
            return Err(TimerError::Audit(format!(
                "actor must be 1 to {ACTOR_MAX} bytes, got {}",
                actor.len()
            )));
        }
        let seq = self
            .tip
            .0
            .checked_add(1)
            .ok_or_else(|| TimerError::Audit("seq overflow".to_owned()))?;
        let mut entry = AuditEntry {
            seq,
            at,
            actor: actor.to_owned(),
            action,
            category,
            task,
            count,
            prev: self.tip.1,
            hash: GENESIS,
        };
        entry.hash = entry.compute_hash()?;
        let mut line = entry.to_line()?;
        if line.len() > LINE_MAX {
            return Err(TimerError::Audit(
                "entry longer than a line may be".to_owned(),
            ));
        }
        line.push('\n');
        let written = self
            .file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            self.poisoned = true;
            // Best effort: without the partial line, a reopen can succeed.
            let _ = self
                .file
                .set_len(self.len)
                .and_then(|()| self.file.sync_data());
            return Err(io_error("appending", &e));
        }
        let line_len = u64::try_from(line.len()).unwrap_or(u64::MAX);
        self.len = self.len.saturating_add(line_len);
        self.tip = (entry.seq, entry.hash);
        Ok(entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::path::PathBuf;

    fn t(ms: u64) -> UnixTime {
        UnixTime(1_800_000_000_000 + ms)
    }

    /// A log of five entries; returns (dir, path, tip).
    fn five() -> (tempfile::TempDir, PathBuf, (u64, [u8; 32])) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let mut log = AuditLog::open(&path).unwrap();
        log.append(
            t(1),
            "admin-api",
            AuditAction::Pause,
            Some(Category::Expiry),
            None,
            None,
        )
        .unwrap();
        log.append(
            t(2),
            "admin-api",
            AuditAction::Quarantine,
            Some(Category::DeferredSend),
            Some(TaskId([0xab; 16])),
            None,
        )
        .unwrap();
        log.append(
            t(3),
            "admin-api",
            AuditAction::Purge,
            Some(Category::Maintenance),
            None,
            Some(17),
        )
        .unwrap();
        log.append(
            t(4),
            "worker \"7\"\n",
            AuditAction::Release,
            None,
            Some(TaskId([1; 16])),
            None,
        )
        .unwrap();
        log.append(t(5), "admin-api", AuditAction::Resume, None, None, None)
            .unwrap();
        let tip = log.tip();
        (dir, path, tip)
    }

    fn lines(path: &Path) -> Vec<String> {
        fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn write_lines(path: &Path, lines: &[String]) {
        let mut text = lines.join("\n");
        text.push('\n');
        fs::write(path, text).unwrap();
    }

    fn problem(path: &Path, anchor: Option<(u64, [u8; 32])>) -> Problem {
        verify(path, anchor).unwrap().problem.unwrap()
    }

    #[test]
    fn format_is_as_documented() {
        let (_dir, path, _) = five();
        let all = lines(&path);
        assert_eq!(
            &all[0][..all[0].find("\"prev\"").unwrap()],
            r#"{"seq":1,"at_ms":1800000000001,"actor":"admin-api","action":"pause","category":"expiry","task":null,"count":null,"#
        );
        assert!(all[1].contains(r#""task":"abababababababababababababababab""#));
        assert!(all[2].contains(r#""count":17,"#));
        // Recompute every hash the way an outside verifier would: strip `,"hash":"<64 hex>"`.
        let mut prev = hex::encode(GENESIS);
        for line in &all {
            assert!(line.contains(&format!(r#""prev":"{prev}","hash":""#)));
            let cut = line.len() - (r#","hash":""#.len() + 64 + r#""}"#.len());
            let unsigned = format!("{}}}", &line[..cut]);
            let mut h = Sha256::new();
            h.update(b"whispr-audit-v1\n");
            h.update(unsigned.as_bytes());
            let hash = hex::encode(h.finalize());
            assert_eq!(&line[cut..], format!(r#","hash":"{hash}"}}"#));
            prev = hash;
        }
    }

    #[test]
    fn append_reopen_continue_and_verify() {
        let (_dir, path, tip) = five();
        let report = verify(&path, Some(tip)).unwrap();
        assert!(report.is_ok(), "{report:?}");
        assert!(report.ok);
        assert_eq!(report.entries, 5);
        assert_eq!(report.tip, tip);
        assert_eq!(
            report.describe(),
            format!("ok: 5 entries, tip seq 5 {}", hex::encode(tip.1))
        );
        let json = serde_json::to_string(&report).unwrap();
        assert_eq!(
            json,
            format!(
                r#"{{"ok":true,"entries":5,"tip_seq":5,"tip_hash":"{}","problem":null}}"#,
                hex::encode(tip.1)
            )
        );

        let mut log = AuditLog::open(&path).unwrap();
        assert_eq!(log.tip(), tip);
        let e = log
            .append(t(6), "cli", AuditAction::Verify, None, None, Some(5))
            .unwrap();
        assert_eq!(e.seq, 6);
        assert_eq!(e.prev, tip.1);
        assert_eq!(e.compute_hash().unwrap(), e.hash);
        assert_eq!(log.tip(), (6, e.hash));
        drop(log);

        let report = verify(&path, Some((6, e.hash))).unwrap();
        assert!(report.is_ok());
        assert_eq!(report.entries, 6);
        // An older anchor still verifies: the log only grew.
        assert!(verify(&path, Some(tip)).unwrap().is_ok());
        assert!(verify(&path, Some((0, GENESIS))).unwrap().is_ok());
        assert_eq!(lines(&path).len(), 6);
    }

    #[test]
    fn empty_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path).unwrap();
        assert_eq!(log.tip(), (0, GENESIS));
        drop(log);
        let report = verify(&path, None).unwrap();
        assert!(report.is_ok());
        assert_eq!(report.entries, 0);
        assert!(AuditLog::open(&path).is_ok());
        let p = problem(&path, Some((1, [7; 32])));
        assert_eq!(
            p.kind,
            ProblemKind::EndsBeforeAnchor {
                anchor_seq: 1,
                last_seq: 0
            }
        );
        // A missing file is an empty log.
        fs::remove_file(&path).unwrap();
        assert!(verify(&path, None).unwrap().is_ok());
        assert!(verify(&path, Some((0, GENESIS))).unwrap().is_ok());
        let p = problem(&path, Some((1, [7; 32])));
        assert_eq!(
            p.kind,
            ProblemKind::EndsBeforeAnchor {
                anchor_seq: 1,
                last_seq: 0
            }
        );
    }

    #[cfg(unix)]
    #[test]
    fn file_mode_is_0600() {
        use std::os::unix::fs::PermissionsExt;
        let (_dir, path, _) = five();
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn edited_byte_in_a_middle_line_is_found_at_that_line() {
        let (_dir, path, tip) = five();
        let mut all = lines(&path);
        all[2] = all[2].replace("\"count\":17", "\"count\":18");
        write_lines(&path, &all);
        let p = problem(&path, None);
        assert_eq!(
            p,
            Problem {
                line: 3,
                kind: ProblemKind::HashMismatch
            }
        );
        let report = verify(&path, Some(tip)).unwrap();
        assert!(!report.ok);
        assert_eq!(report.entries, 2);
        assert_eq!(
            report.describe(),
            "line 3: hash does not match the entry (edited)"
        );
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["ok"], false);
        assert_eq!(json["entries"], 2);
        assert_eq!(json["tip_seq"], 2);
        assert_eq!(json["problem"]["line"], 3);
        assert_eq!(json["problem"]["kind"], "hash_mismatch");
        assert_eq!(report.problem.unwrap().line, 3);
        assert!(AuditLog::open(&path).is_err());
    }

    #[test]
    fn every_single_byte_edit_is_found_at_its_line() {
        let (_dir, path, _) = five();
        let original = fs::read(&path).unwrap();
        let start = original.iter().position(|&b| b == b'\n').unwrap() + 1;
        let end = start + original[start..].iter().position(|&b| b == b'\n').unwrap();
        // Every byte of line 2, its newline included, replaced by a few others.
        for i in start..=end {
            for replacement in [b'0', b'1', b'a', b' ', b'"', b'\n', b'}', 0xff] {
                if original[i] == replacement {
                    continue;
                }
                let mut bytes = original.clone();
                bytes[i] = replacement;
                fs::write(&path, &bytes).unwrap();
                let report = verify(&path, None).unwrap();
                let p = report
                    .problem
                    .unwrap_or_else(|| panic!("byte {i} -> {replacement:#x} not detected"));
                assert_eq!(p.line, 2, "byte {i} -> {replacement:#x}: {p}");
                assert_eq!(report.entries, 1);
            }
        }
    }

    #[test]
    fn whitespace_or_escape_variants_count_as_edits() {
        let (_dir, path, _) = five();
        let mut all = lines(&path);
        all[1] = all[1].replacen("\"seq\":2", "\"seq\": 2", 1);
        write_lines(&path, &all);
        assert_eq!(problem(&path, None).kind, ProblemKind::NotCanonical);

        let (_dir, path, _) = five();
        let mut all = lines(&path);
        all[1] = all[1].replacen("admin-api", "\\u0061dmin-api", 1);
        write_lines(&path, &all);
        assert_eq!(problem(&path, None).kind, ProblemKind::NotCanonical);
    }

    #[test]
    fn deleted_middle_line_is_found() {
        let (_dir, path, tip) = five();
        let mut all = lines(&path);
        all.remove(2);
        write_lines(&path, &all);
        let p = problem(&path, None);
        assert_eq!(
            p,
            Problem {
                line: 3,
                kind: ProblemKind::Missing {
                    expected: 3,
                    found: 4
                }
            }
        );
        assert_eq!(problem(&path, Some(tip)).line, 3);
        assert!(AuditLog::open(&path).is_err());
    }

    #[test]
    fn deleted_first_line_is_found() {
        let (_dir, path, _) = five();
        let mut all = lines(&path);
        all.remove(0);
        write_lines(&path, &all);
        assert_eq!(
            problem(&path, None),
            Problem {
                line: 1,
                kind: ProblemKind::Missing {
                    expected: 1,
                    found: 2
                }
            }
        );
    }

    #[test]
    fn deleted_last_line_is_found_only_with_the_anchor() {
        let (_dir, path, tip) = five();
        let mut all = lines(&path);
        all.pop();
        write_lines(&path, &all);

        // Without an anchor the shorter log is a valid chain of its own.
        let report = verify(&path, None).unwrap();
        assert!(report.is_ok());
        assert_eq!(report.entries, 4);
        assert_eq!(report.tip.0, 4);

        // With the anchor the removal shows.
        let report = verify(&path, Some(tip)).unwrap();
        assert_eq!(
            report.problem.unwrap(),
            Problem {
                line: 5,
                kind: ProblemKind::EndsBeforeAnchor {
                    anchor_seq: 5,
                    last_seq: 4
                }
            }
        );
        assert!(AuditLog::open_anchored(&path, Some(tip)).is_err());
        assert!(AuditLog::open(&path).is_ok());
    }

    #[test]
    fn rewritten_log_is_found_with_the_anchor() {
        let (_dir, path, tip) = five();
        // Someone rebuilds a whole different chain of the same length.
        fs::remove_file(&path).unwrap();
        let mut log = AuditLog::open(&path).unwrap();
        for i in 0..5 {
            log.append(t(i), "intruder", AuditAction::Resume, None, None, None)
                .unwrap();
        }
        drop(log);
        assert!(verify(&path, None).unwrap().is_ok());
        assert_eq!(
            problem(&path, Some(tip)),
            Problem {
                line: 5,
                kind: ProblemKind::AnchorMismatch { anchor_seq: 5 }
            }
        );
    }

    #[test]
    fn swapped_lines_are_found() {
        let (_dir, path, _) = five();
        let mut all = lines(&path);
        all.swap(1, 2);
        write_lines(&path, &all);
        assert_eq!(
            problem(&path, None),
            Problem {
                line: 2,
                kind: ProblemKind::OutOfOrder {
                    expected: 2,
                    found: 3
                }
            }
        );
        assert!(AuditLog::open(&path).is_err());
    }

    #[test]
    fn duplicated_line_is_found() {
        let (_dir, path, _) = five();
        let mut all = lines(&path);
        let copy = all[1].clone();
        all.insert(2, copy);
        write_lines(&path, &all);
        assert_eq!(
            problem(&path, None),
            Problem {
                line: 3,
                kind: ProblemKind::OutOfOrder {
                    expected: 3,
                    found: 2
                }
            }
        );
    }

    #[test]
    fn replaced_entry_with_a_valid_hash_breaks_the_link() {
        let (_dir, path, _) = five();
        // A self-consistent entry 3 whose prev is not entry 2's hash.
        let fake = AuditEntry {
            seq: 3,
            at: t(3),
            actor: "admin-api".to_owned(),
            action: AuditAction::Purge,
            category: None,
            task: None,
            count: Some(0),
            prev: [9; 32],
            hash: GENESIS,
        };
        let fake = AuditEntry {
            hash: fake.compute_hash().unwrap(),
            ..fake
        };
        let mut all = lines(&path);
        all[2] = fake.to_line().unwrap();
        write_lines(&path, &all);
        assert_eq!(
            problem(&path, None),
            Problem {
                line: 3,
                kind: ProblemKind::BrokenLink
            }
        );
    }

    #[test]
    fn garbage_line_is_found() {
        let (_dir, path, _) = five();
        let mut all = lines(&path);
        all.insert(3, "this is not json".to_owned());
        write_lines(&path, &all);
        let p = problem(&path, None);
        assert_eq!(p.line, 4);
        assert!(matches!(p.kind, ProblemKind::Malformed(_)), "{p}");
        assert!(AuditLog::open(&path).is_err());

        for bad in [
            "",
            "{}",
            "[1,2]",
            "{\"seq\":4}",
            "\u{feff}{}",
            "{\"seq\":-1,\"at_ms\":0}",
        ] {
            let (_dir, path, _) = five();
            let mut all = lines(&path);
            all.insert(1, bad.to_owned());
            write_lines(&path, &all);
            let p = problem(&path, None);
            assert_eq!(p.line, 2, "{bad:?}");
            assert!(matches!(p.kind, ProblemKind::Malformed(_)), "{bad:?}: {p}");
        }
    }

    #[test]
    fn unknown_member_or_value_is_malformed() {
        let (_dir, path, _) = five();
        let mut all = lines(&path);
        all[0] = all[0].replacen("\"seq\":1,", "\"seq\":1,\"owner\":\"x\",", 1);
        write_lines(&path, &all);
        assert!(matches!(
            problem(&path, None).kind,
            ProblemKind::Malformed(_)
        ));

        let (_dir, path, _) = five();
        let mut all = lines(&path);
        all[0] = all[0].replacen("\"pause\"", "\"delete\"", 1);
        write_lines(&path, &all);
        assert!(matches!(
            problem(&path, None).kind,
            ProblemKind::Malformed(_)
        ));
    }

    #[test]
    fn truncated_last_line_is_found() {
        let (_dir, path, _) = five();
        let bytes = fs::read(&path).unwrap();
        // Only the newline missing.
        fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        assert_eq!(
            problem(&path, None),
            Problem {
                line: 5,
                kind: ProblemKind::TruncatedLastLine
            }
        );
        // Cut in the middle.
        fs::write(&path, &bytes[..bytes.len() - 40]).unwrap();
        assert_eq!(problem(&path, None).kind, ProblemKind::TruncatedLastLine);
        assert!(AuditLog::open(&path).is_err());
    }

    #[test]
    fn overlong_line_is_refused() {
        let (_dir, path, _) = five();
        let mut all = lines(&path);
        all.insert(2, "x".repeat(LINE_MAX + 1));
        write_lines(&path, &all);
        assert_eq!(
            problem(&path, None),
            Problem {
                line: 3,
                kind: ProblemKind::LineTooLong
            }
        );
        // A huge file without any newline is refused after LINE_MAX + 1 bytes.
        fs::write(&path, vec![b'{'; 1 << 20]).unwrap();
        assert_eq!(problem(&path, None).kind, ProblemKind::LineTooLong);
    }

    #[test]
    fn reopening_a_tampered_log_is_refused_and_leaves_it_alone() {
        let (_dir, path, _) = five();
        let mut all = lines(&path);
        all[1] = all[1].replacen("quarantine", "release", 1);
        write_lines(&path, &all);
        let before = fs::read(&path).unwrap();
        let err = AuditLog::open(&path).unwrap_err();
        assert!(matches!(err, TimerError::Audit(_)));
        assert!(err.to_string().contains("line 2"), "{err}");
        assert_eq!(fs::read(&path).unwrap(), before);
    }

    #[test]
    fn actor_length_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let mut log = AuditLog::open(&path).unwrap();
        let long = "a".repeat(ACTOR_MAX + 1);
        for actor in ["", long.as_str()] {
            let err = log
                .append(t(0), actor, AuditAction::Pause, None, None, None)
                .unwrap_err();
            assert!(matches!(err, TimerError::Audit(_)));
        }
        assert_eq!(log.tip(), (0, GENESIS));
        // The longest actor, made of characters that JSON escapes, still fits a line.
        let worst = "\u{1}".repeat(ACTOR_MAX);
        log.append(
            t(0),
            &worst,
            AuditAction::Quarantine,
            Some(Category::DeferredSend),
            Some(TaskId([0xff; 16])),
            Some(u64::MAX),
        )
        .unwrap();
        drop(log);
        assert!(verify(&path, None).unwrap().is_ok());
    }

    #[test]
    fn a_second_writer_is_refused() {
        let (_dir, path, _) = five();
        let log = AuditLog::open(&path).unwrap();
        assert!(AuditLog::open(&path).is_err());
        // Reading alongside the writer is fine.
        assert!(verify(&path, Some(log.tip())).unwrap().is_ok());
        drop(log);
        assert!(AuditLog::open(&path).is_ok());
    }

    #[test]
    fn action_names_round_trip() {
        for a in AuditAction::ALL {
            assert_eq!(AuditAction::parse(a.name()), Some(a));
        }
        assert_eq!(AuditAction::parse("Pause"), None);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// Arbitrary bytes never make verify panic.
        #[test]
        fn arbitrary_content_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048)) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("audit.log");
            fs::write(&path, &bytes).unwrap();
            let _ = verify(&path, Some((3, [1; 32])));
        }

        /// Any change to a valid log's bytes (splice of arbitrary bytes) is noticed.
        #[test]
        fn any_splice_is_detected(at in 0usize..4096, cut in 0usize..8, insert in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..8)) {
            let (_dir, path, tip) = five();
            let original = fs::read(&path).unwrap();
            let at = at % original.len();
            let end = (at + cut).min(original.len());
            let mut bytes = original[..at].to_vec();
            bytes.extend_from_slice(&insert);
            bytes.extend_from_slice(&original[end..]);
            proptest::prop_assume!(bytes != original);
            fs::write(&path, &bytes).unwrap();
            proptest::prop_assert!(!verify(&path, Some(tip)).unwrap().is_ok());
        }
    }
}
