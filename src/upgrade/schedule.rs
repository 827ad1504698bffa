//! When scheduled upgrades are due: the stack's five-field cron schedule,
//! read in UTC, and the window after each scheduled time in which its
//! upgrade may still start. A scheduled time is served once: the state
//! records the last one, so a daemon restarted or a cron job run twice in
//! the window does not upgrade twice, and one down for longer than the
//! window skips that time instead of upgrading at an unplanned hour.

use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};

#[derive(Debug, thiserror::Error)]
#[error("the upgrade schedule {schedule:?} cannot be read: {reason}")]
pub struct ScheduleError {
    schedule: String,
    reason: String,
}

fn cron(schedule: &str) -> Result<croner::Cron, ScheduleError> {
    schedule.parse::<croner::Cron>().map_err(|e| ScheduleError {
        schedule: schedule.to_string(),
        reason: e.to_string(),
    })
}

fn utc(time: SystemTime) -> DateTime<Utc> {
    DateTime::<Utc>::from(time)
}

/// The scheduled time whose upgrade is due at `now`: the latest at or
/// before `now`, when it is at most `window` ago and later than `served`.
pub fn due(
    schedule: &str,
    window: Duration,
    served: Option<SystemTime>,
    now: SystemTime,
) -> Result<Option<SystemTime>, ScheduleError> {
    let cron = cron(schedule)?;
    let Ok(latest) = cron.find_previous_occurrence(&utc(now), true) else {
        return Ok(None);
    };
    // Whole seconds, as the state records a served time (croner keeps the
    // fraction of `now`).
    let latest = SystemTime::UNIX_EPOCH + Duration::from_secs(latest.timestamp().max(0) as u64);
    let within = now.duration_since(latest).unwrap_or_default() <= window;
    let fresh = served.is_none_or(|served| served < latest);
    Ok((within && fresh).then_some(latest))
}

/// The first scheduled time after `now`.
pub fn next(schedule: &str, now: SystemTime) -> Result<Option<SystemTime>, ScheduleError> {
    Ok(cron(schedule)?
        .find_next_occurrence(&utc(now), false)
        .ok()
        .map(SystemTime::from))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> SystemTime {
        humantime::parse_rfc3339(text).unwrap()
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn a_scheduled_time_is_due_within_its_window_once() {
        // Sundays at 03:00 UTC; 2026-12-06 is a Sunday.
        let schedule = "0 3 * * 0";
        let sunday = at("2026-12-06T03:00:00Z");
        assert_eq!(
            due(schedule, HOUR, None, at("2026-12-06T02:59:00Z")).unwrap(),
            None
        );
        assert_eq!(
            due(schedule, HOUR, None, at("2026-12-06T03:00:00Z")).unwrap(),
            Some(sunday)
        );
        assert_eq!(
            due(schedule, HOUR, None, at("2026-12-06T03:40:00Z")).unwrap(),
            Some(sunday)
        );
        assert_eq!(
            due(schedule, HOUR, Some(sunday), at("2026-12-06T03:40:00Z")).unwrap(),
            None,
            "served already"
        );
        let fraction = at("2026-12-06T03:00:00Z") + Duration::from_millis(250);
        assert_eq!(
            due(schedule, HOUR, Some(sunday), fraction).unwrap(),
            None,
            "served already, a fraction of a second after the time"
        );
        assert_eq!(
            due(schedule, HOUR, None, at("2026-12-06T04:01:00Z")).unwrap(),
            None,
            "the window passed"
        );
        assert_eq!(
            next(schedule, at("2026-12-06T03:00:00Z")).unwrap(),
            Some(at("2026-12-13T03:00:00Z"))
        );
    }
}
