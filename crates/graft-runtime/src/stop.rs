//! Ctrl-C and SIGTERM during a run: the first one asks the run to stop after the step in
//! progress, save a checkpoint and export the adapter; a second one ends the process at once.
//!
//! The signal handler only sets a flag (nothing else is safe there); the training loops read it
//! between steps and while a watch-mode run waits for a rebuild.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;

static REQUESTED: AtomicBool = AtomicBool::new(false);

/// True once Ctrl-C or SIGTERM was received (or [`request`] was called).
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// Asks the running loop to stop and save, as Ctrl-C does.
pub fn request() {
    REQUESTED.store(true, Ordering::SeqCst);
}

/// Installs the Ctrl-C / SIGTERM handler (once per process; later calls do nothing).
pub fn install() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(install_handler);
}

#[cfg(unix)]
extern "C" fn on_signal(_signal: libc::c_int) {
    if REQUESTED.swap(true, Ordering::SeqCst) {
        // The second signal: the user does not want to wait for the save.
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(130) }
    }
}

#[cfg(unix)]
fn install_handler() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only touches an atomic and calls _exit, both async-signal-safe.
        let previous = unsafe { libc::signal(signal, on_signal as *const () as libc::sighandler_t) };
        if previous == libc::SIG_ERR {
            tracing::warn!("cannot handle signal {signal}: stopping will not save a checkpoint");
        }
    }
}

#[cfg(not(unix))]
fn install_handler() {
    tracing::debug!("Ctrl-C is not handled on this platform: stopping with it does not save");
}
