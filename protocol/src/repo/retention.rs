//! Which snapshots a retention policy keeps (`docs/PROTOCOL.md` §13.8),
//! with restic's meanings, from snapshot ids, times (Unix seconds, UTC) and
//! tags alone: the client applies it with the tags it decrypts, the
//! server's operator without keys and without tags.

use std::collections::BTreeSet;
use std::time::Duration;

/// Which snapshots a policy keeps. A snapshot is kept when any rule keeps
/// it; a policy with no rule keeps everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeepPolicy {
    /// The N newest snapshots.
    pub last: Option<u32>,
    /// The newest snapshot of each of the N newest hours (days, weeks,
    /// months, years) that have one.
    pub hourly: Option<u32>,
    pub daily: Option<u32>,
    pub weekly: Option<u32>,
    pub monthly: Option<u32>,
    pub yearly: Option<u32>,
    /// Snapshots within this long before the newest snapshot.
    pub within: Option<Duration>,
    /// Snapshots with any of these tags.
    pub tags: Vec<String>,
}

impl KeepPolicy {
    /// Whether no rule is set.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Days since 1970-01-01 to (year, month 1..=12), proleptic Gregorian.
fn year_month(days: i64) -> (i64, i64) {
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month)
}

/// The bucket of a snapshot time (Unix seconds) under one rule.
type Bucket = fn(u64) -> i64;

/// The ids of `snapshots` (id, time, tags) that `policy` does not keep,
/// ascending.
pub fn not_kept(snapshots: &[(u64, u64, Vec<String>)], policy: &KeepPolicy) -> Vec<u64> {
    if policy.is_empty() {
        return Vec::new();
    }
    let mut newest_first: Vec<&(u64, u64, Vec<String>)> = snapshots.iter().collect();
    newest_first.sort_unstable_by_key(|(id, time, _)| std::cmp::Reverse((*time, *id)));
    let mut keep = BTreeSet::new();
    let bucket_rules: [(Option<u32>, Bucket); 6] = [
        (policy.last, |_| -1),
        (policy.hourly, |t| (t / 3600) as i64),
        (policy.daily, |t| (t / 86_400) as i64),
        // Weeks from Monday: 1970-01-01 was a Thursday.
        (policy.weekly, |t| ((t / 86_400) as i64 + 3).div_euclid(7)),
        (policy.monthly, |t| {
            let (y, m) = year_month((t / 86_400) as i64);
            y * 12 + m
        }),
        (policy.yearly, |t| year_month((t / 86_400) as i64).0),
    ];
    for (i, (count, bucket)) in bucket_rules.iter().enumerate() {
        let Some(mut left) = *count else { continue };
        let mut last = None;
        for (id, time, _) in &newest_first {
            if left == 0 {
                break;
            }
            let b = bucket(*time);
            // keep-last counts every snapshot; the others one per bucket.
            if i == 0 || last != Some(b) {
                keep.insert(*id);
                left -= 1;
                last = Some(b);
            }
        }
    }
    if let (Some(within), Some((_, newest, _))) = (policy.within, newest_first.first()) {
        let from = newest.saturating_sub(within.as_secs());
        keep.extend(
            newest_first
                .iter()
                .filter(|(_, t, _)| *t >= from)
                .map(|(id, _, _)| *id),
        );
    }
    keep.extend(
        snapshots
            .iter()
            .filter(|(_, _, tags)| tags.iter().any(|t| policy.tags.contains(t)))
            .map(|(id, _, _)| *id),
    );
    let mut gone: Vec<u64> = snapshots
        .iter()
        .map(|(id, _, _)| *id)
        .filter(|id| !keep.contains(id))
        .collect();
    gone.sort_unstable();
    gone
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: u64 = 3600;
    const DAY: u64 = 86_400;

    fn snaps(times: &[u64]) -> Vec<(u64, u64, Vec<String>)> {
        times
            .iter()
            .enumerate()
            .map(|(i, t)| (i as u64 + 1, *t, Vec::new()))
            .collect()
    }

    #[test]
    fn keeps_everything_without_a_rule() {
        assert!(not_kept(&snaps(&[1, 2, 3]), &KeepPolicy::default()).is_empty());
    }

    #[test]
    fn keep_last_keeps_the_newest_by_time_not_by_id() {
        let s = snaps(&[300, 100, 200, 50]);
        let p = KeepPolicy {
            last: Some(2),
            ..KeepPolicy::default()
        };
        assert_eq!(not_kept(&s, &p), vec![2, 4]);
    }

    #[test]
    fn keep_daily_keeps_the_newest_of_each_day() {
        // Two on day 10, one on day 11, two on day 12.
        let s = snaps(&[
            10 * DAY + HOUR,
            10 * DAY + 5 * HOUR,
            11 * DAY,
            12 * DAY + HOUR,
            12 * DAY + 2 * HOUR,
        ]);
        let p = KeepPolicy {
            daily: Some(2),
            ..KeepPolicy::default()
        };
        assert_eq!(not_kept(&s, &p), vec![1, 2, 4]);
        let p = KeepPolicy {
            daily: Some(10),
            ..KeepPolicy::default()
        };
        assert_eq!(not_kept(&s, &p), vec![1, 4]);
    }

    #[test]
    fn weeks_begin_on_monday_and_months_follow_the_calendar() {
        // 2024-01-07 is a Sunday, 2024-01-08 a Monday.
        let sunday = 19_729 * DAY;
        let monday = sunday + DAY;
        let s = snaps(&[sunday - DAY, sunday, monday]);
        let p = KeepPolicy {
            weekly: Some(5),
            ..KeepPolicy::default()
        };
        assert_eq!(not_kept(&s, &p), vec![1]);
        // 2024-01-31 and 2024-02-01; 2023-12-31.
        let jan31 = 19_753 * DAY;
        let s = snaps(&[jan31 - 31 * DAY, jan31, jan31 + DAY]);
        let p = KeepPolicy {
            monthly: Some(5),
            ..KeepPolicy::default()
        };
        assert!(not_kept(&s, &p).is_empty());
        let p = KeepPolicy {
            yearly: Some(5),
            ..KeepPolicy::default()
        };
        assert_eq!(not_kept(&s, &p), vec![2]);
        assert_eq!(year_month(19_753), (2024, 1));
        assert_eq!(year_month(19_754), (2024, 2));
        assert_eq!(year_month(0), (1970, 1));
    }

    #[test]
    fn keep_within_reads_from_the_newest_snapshot_and_tags_keep_their_own() {
        let mut s = snaps(&[100 * DAY, 101 * DAY, 110 * DAY]);
        s[0].2 = vec!["monthly".into()];
        let p = KeepPolicy {
            within: Some(Duration::from_secs(9 * DAY)),
            ..KeepPolicy::default()
        };
        assert_eq!(not_kept(&s, &p), vec![1]);
        let p = KeepPolicy {
            within: Some(Duration::from_secs(9 * DAY)),
            tags: vec!["monthly".into()],
            ..KeepPolicy::default()
        };
        assert!(not_kept(&s, &p).is_empty());
    }
}
