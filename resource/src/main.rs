//! `locker-resource`: the Concourse resource for locker. Installed as `/opt/resource/check`,
//! `/opt/resource/in` and `/opt/resource/out`, it picks its command from the basename of argv[0]
//! (`locker-resource check|in|out ...` works too).
//!
//! This file only does the protocol: the request is JSON on stdin, the response JSON on stdout,
//! every log line goes to stderr, and a failure is one line on stderr and exit status 1. The
//! work runs on a tokio runtime, raced against SIGTERM and SIGINT: Concourse signals a step it
//! aborts, and the resource then gives back anything it may have been granted before exiting.

mod client;
mod commands;
mod error;
mod lock;
mod models;
mod pool;
mod pool_commands;
mod trigger;
mod variables;
mod waits;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use error::ResourceError;

/// Writes one log line to stderr (stdout carries the response only).
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => { eprintln!($($arg)*) };
}

/// The three commands of the resource protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Check,
    In,
    Out,
}

impl Command {
    fn name(self) -> &'static str {
        match self {
            Command::Check => "check",
            Command::In => "in",
            Command::Out => "out",
        }
    }

    fn from_name(name: &str) -> Option<Command> {
        match name {
            "check" => Some(Command::Check),
            "in" => Some(Command::In),
            "out" => Some(Command::Out),
            _ => None,
        }
    }
}

/// The command and its arguments, from argv: by the program's basename, else by the first
/// argument.
fn parse_args(args: &[String]) -> Result<(Command, Vec<String>), ResourceError> {
    let program = args
        .first()
        .map(String::as_str)
        .unwrap_or("locker-resource");
    let basename = Path::new(program)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(program);
    if let Some(command) = Command::from_name(basename) {
        return Ok((command, args[1..].to_vec()));
    }
    match args.get(1).and_then(|a| Command::from_name(a)) {
        Some(command) => Ok((command, args[2..].to_vec())),
        None => Err(ResourceError::Usage(format!(
            "usage: {basename} check | in DIR | out DIR (request JSON on stdin), \
             or install as /opt/resource/check, in, out"
        ))),
    }
}

/// SIGTERM and SIGINT, listened to for the whole run.
struct Signals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Signals, ResourceError> {
        use tokio::signal::unix::{SignalKind, signal};
        let listen = |kind: SignalKind| signal(kind).map_err(ResourceError::Signals);
        Ok(Signals {
            terminate: listen(SignalKind::terminate())?,
            interrupt: listen(SignalKind::interrupt())?,
        })
    }

    /// The name of the next signal received.
    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.interrupt.recv() => "SIGINT",
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    match run(&args) {
        Ok(response) => {
            println!("{response}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            // One line, whatever the message holds.
            log!("error: {}", error.to_string().replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> Result<String, ResourceError> {
    let (command, rest) = parse_args(args)?;
    let directory = match command {
        Command::Check => None,
        Command::In | Command::Out => Some(PathBuf::from(rest.first().ok_or_else(|| {
            ResourceError::Usage(format!(
                "usage: {} DIR: the directory argument is missing",
                command.name()
            ))
        })?)),
    };
    let mut input = String::new();
    std::io::stdin()
        .read_to_string(&mut input)
        .map_err(ResourceError::Stdin)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ResourceError::Runtime)?;
    let environment = lock::BuildEnv::from_process();
    let retry = client::retry_policy_from_env();
    let abort = commands::Abort::default();
    let response = runtime.block_on(async {
        let mut signals = Signals::new()?;
        let work = async {
            match command {
                Command::Check => commands::check(&input, retry).await,
                Command::In => {
                    commands::fetch(
                        &input,
                        directory.as_deref().unwrap_or(Path::new(".")),
                        retry,
                    )
                    .await
                }
                Command::Out => {
                    commands::put(
                        &input,
                        directory.as_deref().unwrap_or(Path::new(".")),
                        &environment,
                        retry,
                        &abort,
                    )
                    .await
                }
            }
        };
        // Concourse stops an aborted or timed-out step by signalling it: stop at once (the
        // work, and its requests, are dropped), release anything a grant may have given us,
        // and fail.
        tokio::select! {
            result = work => result,
            signal = signals.next() => Err(ResourceError::Stopped(commands::clean_up(&abort, signal).await)),
        }
    })?;
    serde_json::to_string(&response).map_err(ResourceError::Encode)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn dispatches_on_basename_or_first_argument() {
        type Case<'a> = (&'a [&'a str], Option<(Command, &'a [&'a str])>);
        let cases: [Case; 7] = [
            (&["/opt/resource/check"], Some((Command::Check, &[]))),
            (
                &["/opt/resource/in", "/tmp/d"],
                Some((Command::In, &["/tmp/d"])),
            ),
            (&["out", "/tmp/s"], Some((Command::Out, &["/tmp/s"]))),
            (
                &["locker-resource", "in", "/d"],
                Some((Command::In, &["/d"])),
            ),
            (
                &["/x/locker-resource", "check"],
                Some((Command::Check, &[])),
            ),
            (&["locker-resource"], None),
            (&["locker-resource", "status"], None),
        ];
        for (argv, expected) in cases {
            let parsed = parse_args(&args(argv)).ok();
            let expected = expected.map(|(c, rest)| (c, args(rest)));
            assert_eq!(parsed, expected, "{argv:?}");
        }
    }
}
