//! `locker lock NAME -- CMD...`: wait for the lock, run the command while holding it, renew the
//! lease in the background, forward signals, release when the command exits (the machinery is
//! [`super::hold`]'s, shared with `locker pool acquire`).

use locker_client::Target;
use locker_client::duration::WireDuration;
use locker_client::wire::LockRequest;

use super::hold::{self, Holding, Run, Signals};
use super::http::Connection;
use super::{Failure, LockArgs};

pub async fn run(connection: Connection, args: LockArgs) -> Result<u8, Failure> {
    let mut signals = Signals::new()?;
    let id = hold::invocation_id();
    let key = args.key.clone().unwrap_or_else(|| id.clone());
    let requestor = args.requestor.clone().unwrap_or_else(|| id.clone());
    let holding = Holding {
        target: Target::lock(&args.name),
        body: LockRequest {
            key: key.clone(),
            requestor: Some(requestor.clone()),
            info: Some(hold::info("locker lock", &id, &args.command)),
            ttl: (!args.ttl.is_zero()).then_some(WireDuration(args.ttl)),
            slots: args.slots,
            ..LockRequest::default()
        },
        wait: args.wait.and_then(|w| w.0),
    };
    let held = hold::take(&connection, holding, &mut signals).await?;
    let env = [
        ("LOCKER_LOCK_NAME", args.name.clone()),
        ("LOCKER_LOCK_KEY", key),
        ("LOCKER_LOCK_REQUESTOR", requestor),
        ("LOCKER_LOCK_GENERATION", held.generation.to_string()),
    ];
    let run = Run {
        command: &args.command,
        env: env.map(|(k, v)| (k.to_string(), v.into())).to_vec(),
        ttl: args.ttl,
        grace: args.grace,
    };
    hold::run_and_release(&connection, &held, run, &mut signals).await
}
