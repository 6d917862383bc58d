//! A strategy's private state (`save_state` / `load_state`) as the plugin's own serde struct,
//! so no plugin writes JSON by hand.
//!
//! ```ignore
//! #[derive(serde::Serialize, serde::Deserialize, Default)]
//! struct State { stage: usize }
//!
//! fn save_state(&self) -> Result<String> { graft_sdk::state::save(&self.state) }
//! fn load_state(&mut self, json: &str) -> Result<()> {
//!     self.state = graft_sdk::state::load(json)?;
//!     Ok(())
//! }
//! ```

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, Result};

/// The state as JSON.
pub fn save<S: Serialize>(state: &S) -> Result<String> {
    serde_json::to_string(state).map_err(|e| Error::msg(format!("the strategy state cannot be written as JSON: {e}")))
}

/// The state from JSON written by [`save`]; an empty string or `{}` from a host that had no state
/// yet gives `S::default()`.
pub fn load<S: DeserializeOwned + Default>(json: &str) -> Result<S> {
    let text = json.trim();
    if text.is_empty() || text == "{}" {
        return Ok(S::default());
    }
    serde_json::from_str(text).map_err(|e| Error::msg(format!("the saved strategy state does not fit this build: {e} (state: {text})")))
}

#[cfg(test)]
mod tests {
    #[derive(serde::Serialize, serde::Deserialize, Default, Debug, PartialEq)]
    struct State {
        stage: usize,
        seen: Vec<u64>,
    }

    #[test]
    fn round_trip_and_defaults() {
        let s = State { stage: 2, seen: vec![5, 7] };
        assert_eq!(super::load::<State>(&super::save(&s).unwrap()).unwrap(), s);
        assert_eq!(super::load::<State>("{}").unwrap(), State::default());
        assert_eq!(super::load::<State>("").unwrap(), State::default());
        let e = super::load::<State>(r#"{"stage": "x"}"#).unwrap_err();
        assert!(e.message().contains("does not fit this build"), "{e}");
    }
}
