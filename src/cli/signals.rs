//! SIGINT and SIGTERM, turned into the run's cancellation token: the first
//! asks the engine to stop soon, the second to stop now, a third ends the
//! process at once (for a run stuck where nothing watches the token).

use tokio::signal::unix::{signal, SignalKind};

use crate::engine::{Cancel, Level, StopReason};

/// The exit code of a run stopped for `reason`: 128 + the signal's number.
pub fn exit_code(reason: StopReason) -> u8 {
    match reason {
        StopReason::Interrupt => 130,
        StopReason::Terminate => 143,
    }
}

/// Feeds both signals to `cancel` for as long as the runtime runs.
pub fn watch(cancel: &Cancel) -> std::io::Result<()> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let cancel = cancel.clone();
    tokio::spawn(async move {
        let mut stops = 0;
        loop {
            let reason = tokio::select! {
                _ = interrupt.recv() => StopReason::Interrupt,
                _ = terminate.recv() => StopReason::Terminate,
            };
            stops += 1;
            if cancel.request(reason) == Level::Now && stops > 2 {
                eprintln!("{} a third time: exiting at once", reason.signal_name());
                std::process::exit(i32::from(exit_code(reason)));
            }
        }
    });
    Ok(())
}

/// The exit code of a run that failed: 130 or 143 when a signal stopped
/// it, else 1 (a refusal to act without `--yes` included).
pub fn failure_code(cancel: &Cancel) -> u8 {
    cancel.reason().map_or(1, exit_code)
}
