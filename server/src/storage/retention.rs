//! Which versions of a name to remove: one pure function for every
//! metadata backend, used at commit and by the operator's prune.

use std::time::{Duration, SystemTime};

/// Which versions of a name to keep. A version is kept if it is the newest
/// of its name, or if any rule that is set keeps it; with no rule set,
/// everything is kept (the default).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Retention {
    /// Keep the N newest versions (N >= 1).
    pub keep_last: Option<u32>,
    /// Keep versions stored within this long of now.
    pub keep_within: Option<Duration>,
}

impl Retention {
    /// No rule: every version stays.
    pub const KEEP_ALL: Self = Self {
        keep_last: None,
        keep_within: None,
    };

    /// Whether no rule is set, so nothing is ever removed.
    pub fn keeps_everything(&self) -> bool {
        self.keep_last.is_none() && self.keep_within.is_none()
    }

    /// Whether the version at `index` among its name's versions (0: the
    /// newest), stored at `stored_at`, is kept at time `now`. The newest
    /// version is always kept.
    pub fn keeps(&self, index: usize, stored_at: SystemTime, now: SystemTime) -> bool {
        if index == 0 || self.keeps_everything() {
            return true;
        }
        let by_count = self
            .keep_last
            .is_some_and(|n| index < usize::try_from(n).unwrap_or(usize::MAX));
        // A version stored "in the future" (clock change) counts as recent.
        let by_age = self
            .keep_within
            .is_some_and(|d| match now.duration_since(stored_at) {
                Ok(age) => age <= d,
                Err(_) => true,
            });
        by_count || by_age
    }
}

/// What [`versions_to_remove`] needs to know of one version of a name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VersionStamp {
    /// The version number; a higher number is a newer version.
    pub number: i64,
    pub stored_at: SystemTime,
}

/// The numbers of the versions of one name (`versions`, in any order) that
/// `retention` does not keep at `now`, in ascending order. Nothing is
/// removed for an `append_only` client, and the newest version always
/// stays. Every metadata backend applies this at commit (with the
/// client's append-only flag) and in a prune (with `false`: an operator's
/// prune reaches append-only clients too).
pub fn versions_to_remove(
    versions: &[VersionStamp],
    retention: &Retention,
    append_only: bool,
    now: SystemTime,
) -> Vec<i64> {
    if append_only || retention.keeps_everything() {
        return Vec::new();
    }
    let mut newest_first: Vec<&VersionStamp> = versions.iter().collect();
    newest_first.sort_unstable_by_key(|v| std::cmp::Reverse(v.number));
    let mut removed: Vec<i64> = newest_first
        .into_iter()
        .enumerate()
        .filter(|(i, v)| !retention.keeps(*i, v.stored_at, now))
        .map(|(_, v)| v.number)
        .collect();
    removed.sort_unstable();
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_keeps_the_newest_and_whatever_either_rule_keeps() {
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);
        let old = now - 48 * hour;
        let recent = now - hour;
        assert!(Retention::KEEP_ALL.keeps(100, old, now));
        let last2 = Retention {
            keep_last: Some(2),
            keep_within: None,
        };
        assert!(last2.keeps(0, old, now));
        assert!(last2.keeps(1, old, now));
        assert!(!last2.keeps(2, recent, now));
        let day = Retention {
            keep_last: None,
            keep_within: Some(24 * hour),
        };
        assert!(day.keeps(0, old, now), "the newest always stays");
        assert!(day.keeps(5, recent, now));
        assert!(!day.keeps(1, old, now));
        assert!(
            day.keeps(1, now + hour, now),
            "a future time counts as recent"
        );
        let both = Retention {
            keep_last: Some(2),
            keep_within: Some(24 * hour),
        };
        assert!(both.keeps(1, old, now));
        assert!(both.keeps(7, recent, now));
        assert!(!both.keeps(2, old, now));
    }

    const HOUR: Duration = Duration::from_secs(3600);

    /// Versions 1..=n, one an hour, the newest stored an hour before `now`.
    fn hourly(n: i64, now: SystemTime) -> Vec<VersionStamp> {
        (1..=n)
            .map(|number| VersionStamp {
                number,
                stored_at: now - HOUR * u32::try_from(n - number + 1).unwrap(),
            })
            .collect()
    }

    fn last(n: u32) -> Retention {
        Retention {
            keep_last: Some(n),
            keep_within: None,
        }
    }

    fn within(hours: u32) -> Retention {
        Retention {
            keep_last: None,
            keep_within: Some(HOUR * hours),
        }
    }

    #[test]
    fn keep_last_removes_all_but_the_newest_n() {
        let now = SystemTime::now();
        assert_eq!(
            versions_to_remove(&hourly(5, now), &last(2), false, now),
            vec![1, 2, 3]
        );
        assert!(versions_to_remove(&hourly(2, now), &last(2), false, now).is_empty());
    }

    #[test]
    fn keep_within_removes_what_is_older_than_the_window() {
        let now = SystemTime::now();
        // Stored 5, 4, 3, 2 and 1 hours ago.
        assert_eq!(
            versions_to_remove(&hourly(5, now), &within(3), false, now),
            vec![1, 2]
        );
    }

    #[test]
    fn with_both_rules_a_version_either_keeps_stays() {
        let now = SystemTime::now();
        let both = Retention {
            keep_last: Some(4),
            keep_within: Some(HOUR * 2),
        };
        // keep-last keeps 3..=6, keep-within keeps 5 and 6.
        assert_eq!(
            versions_to_remove(&hourly(6, now), &both, false, now),
            vec![1, 2]
        );
        let both = Retention {
            keep_last: Some(1),
            keep_within: Some(HOUR * 3),
        };
        assert_eq!(
            versions_to_remove(&hourly(6, now), &both, false, now),
            vec![1, 2, 3]
        );
    }

    #[test]
    fn the_newest_always_stays_whatever_its_age_or_the_input_order() {
        let now = SystemTime::now();
        let mut old = hourly(4, now - HOUR * 1000);
        old.reverse();
        old.swap(0, 2);
        assert_eq!(
            versions_to_remove(&old, &within(1), false, now),
            vec![1, 2, 3]
        );
        let one = hourly(1, now - HOUR * 1000);
        assert!(versions_to_remove(&one, &within(1), false, now).is_empty());
        assert!(versions_to_remove(&[], &last(1), false, now).is_empty());
    }

    #[test]
    fn append_only_and_keep_all_remove_nothing() {
        let now = SystemTime::now();
        let many = hourly(50, now - HOUR * 1000);
        assert!(versions_to_remove(&many, &last(1), true, now).is_empty());
        assert!(versions_to_remove(&many, &within(1), true, now).is_empty());
        assert!(versions_to_remove(&many, &Retention::KEEP_ALL, false, now).is_empty());
    }

    #[test]
    fn a_version_from_the_future_counts_as_recent() {
        let now = SystemTime::now();
        let versions = [
            VersionStamp {
                number: 1,
                stored_at: now + HOUR,
            },
            VersionStamp {
                number: 2,
                stored_at: now - HOUR * 100,
            },
        ];
        assert!(versions_to_remove(&versions, &within(1), false, now).is_empty());
    }
}
