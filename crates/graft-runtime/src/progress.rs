//! Progress bars on long work (stderr; hidden when it is not a terminal).

use indicatif::{ProgressBar, ProgressStyle};

/// A bar of `len` items with a message on its left.
pub fn bar(len: u64, message: &str) -> ProgressBar {
    let bar = ProgressBar::new(len).with_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {per_sec} eta {eta}").expect("valid template").progress_chars("=> "),
    );
    bar.set_message(message.to_string());
    bar
}
