//! Running other programs from a test: find them, run them, and fail with their output when
//! they fail.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

/// A program on PATH, by name.
pub fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
}

/// An exit status with both outputs, for a failure message.
pub fn output_text(output: &Output) -> String {
    format!(
        "{}\n--- stdout\n{}\n--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Runs a command to completion; panics with its output when it fails.
pub fn run_ok(command: &mut Command) -> Output {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        output_text(&output)
    );
    output
}

/// What a command that must succeed printed.
pub fn stdout_of(command: &mut Command) -> String {
    String::from_utf8_lossy(&run_ok(command).stdout).into_owned()
}

/// Waits up to `timeout` for `child` to exit by itself. One still running then is killed, and
/// the test fails with what it wrote to stderr (`what` names it in the message).
pub fn wait_exit_within(child: &mut Child, timeout: Duration, what: &str) {
    let deadline = Instant::now() + timeout;
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let mut stderr = String::new();
            if let Some(mut pipe) = child.stderr.take() {
                let _ = pipe.read_to_string(&mut stderr);
            }
            let _ = child.wait();
            panic!("{what} did not exit within {timeout:?}:\n{stderr}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
