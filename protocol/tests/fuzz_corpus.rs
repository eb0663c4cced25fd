//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) and every saved crash
//! (`fuzz/regressions/<target>/`) through the same entry points the fuzz targets call
//! (`whispr_protocol::fuzzing`), so that plain `cargo test` on stable catches a regression of
//! anything the fuzzers once found, without cargo-fuzz or nightly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use whispr_protocol::fuzzing;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// The regular files in `dir`, sorted; empty if `dir` does not exist.
fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|entry| entry.expect("read directory entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    files
}

fn replay(target: &str, inputs: &[PathBuf]) {
    for path in inputs {
        let bytes =
            std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        assert!(
            fuzzing::run(target, &bytes),
            "fuzzing::run does not know the target {target:?} ({})",
            path.display()
        );
    }
}

#[test]
fn corpus_replays_without_panic() {
    for target in fuzzing::TARGETS {
        let corpus = files(&fuzz_dir().join("corpus").join(target));
        assert!(
            !corpus.is_empty(),
            "fuzz/corpus/{target}/ has no input: run `cargo run -p whispr-protocol --example fuzz_seeds`"
        );
        replay(target, &corpus);
    }
}

#[test]
fn regressions_replay_without_panic() {
    for target in fuzzing::TARGETS {
        replay(target, &files(&fuzz_dir().join("regressions").join(target)));
    }
}

/// A corpus or regression directory whose name is not a target would never be replayed.
#[test]
fn every_input_directory_is_a_target() {
    for kind in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(fuzz_dir().join(kind)) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("read directory entry").path();
            if !path.is_dir() {
                continue;
            }
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            assert!(
                fuzzing::TARGETS.contains(&name),
                "fuzz/{kind}/{name}/ is not one of the fuzz targets {:?}",
                fuzzing::TARGETS
            );
        }
    }
}
