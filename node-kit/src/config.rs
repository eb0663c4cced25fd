//! Reading a node's TOML configuration file. Every node's sections refuse unknown keys
//! (`#[serde(deny_unknown_fields)]`); errors name the key to fix.

use std::path::Path;

/// A configuration problem, naming the key to fix.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct ConfigError {
    /// The config key.
    pub key: String,
    /// What is wrong.
    pub problem: String,
}

impl ConfigError {
    /// A problem with `key`.
    pub fn new(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
        ConfigError {
            key: key.into(),
            problem: problem.into(),
        }
    }
}

/// Reads a TOML file into `T`, naming the offending key on error.
pub fn load_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(path.display().to_string(), format!("cannot read: {e}")))?;
    // toml's message names the key and the line.
    toml::from_str(&text).map_err(|e| ConfigError::new("config", e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Sample {
        data_dir: String,
    }

    #[test]
    fn errors_name_the_file_or_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.toml");
        let err = load_toml::<Sample>(&missing).unwrap_err();
        assert_eq!(err.key, missing.display().to_string());

        let path = dir.path().join("node.toml");
        std::fs::write(&path, "data_dir = \"/d\"\ndata_dri = \"/e\"\n").unwrap();
        let err = load_toml::<Sample>(&path).unwrap_err().to_string();
        assert!(err.contains("data_dri"), "{err}");

        std::fs::write(&path, "data_dir = \"/d\"\n").unwrap();
        assert_eq!(load_toml::<Sample>(&path).unwrap().data_dir, "/d");
    }
}
