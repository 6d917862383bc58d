//! A strategy's configuration: JSON parsed into the plugin's own serde struct.

use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// Parses `json` into `C`, with an error that names the strategy, the problem and where it is.
///
/// An empty string means `{}`. Put `#[serde(deny_unknown_fields)]` on `C` so that a misspelt
/// key is an error instead of silently ignored, and `#[serde(default)]` for optional keys.
pub fn parse<C: DeserializeOwned>(strategy: &str, json: &str) -> Result<C> {
    let text = if json.trim().is_empty() { "{}" } else { json };
    // serde_json's message names the key and where it is ("... at line 1 column 8").
    serde_json::from_str(text).map_err(|e| Error::config(format!("invalid configuration for strategy `{strategy}`: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Cfg {
        #[serde(default = "four")]
        rank: usize,
    }

    fn four() -> usize {
        4
    }

    #[test]
    fn empty_is_default_and_unknown_key_is_named() {
        assert_eq!(parse::<Cfg>("s", "").unwrap(), Cfg { rank: 4 });
        let e = parse::<Cfg>("lora", r#"{"rnak": 8}"#).unwrap_err();
        assert_eq!(e.kind(), graft_abi::ErrorKind::CONFIG);
        assert!(e.message().contains("strategy `lora`"), "{e}");
        assert!(e.message().contains("unknown field `rnak`"), "{e}");
        assert!(e.message().contains("expected `rank`"), "{e}");
    }
}
