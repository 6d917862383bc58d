//! The one rule for names that become file stems and folder names: a run's `output_name`, a
//! compare row, a serve job. (A new plugin's name follows cargo's crate-name rule instead:
//! `graft plugin new`.)

/// Letters, digits, `.`, `_` and `-`, not empty and not starting with `.`: the same file on every
/// system, never a path, never hidden. `what` names the field in the error.
pub fn check_name(what: &str, name: &str) -> crate::error::Result<()> {
    let ok = !name.is_empty() && !name.starts_with('.') && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !ok {
        return Err(crate::error::Error::Config(format!(
            "{what} `{name}`: use letters, digits, `.`, `_` and `-` only, not starting with `.`: a file name without a folder (e.g. `my_style`)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_that_are_files() {
        for good in ["my_style", "lora-r8", "v1.2", "A"] {
            super::check_name("name", good).unwrap();
        }
        for bad in ["", ".", "..", ".hidden", "a/b", "a\\b", "my style", "é"] {
            let e = super::check_name("output_name", bad).unwrap_err().to_string();
            assert!(e.starts_with(&format!("output_name `{bad}`: use letters")), "{e}");
        }
    }
}
