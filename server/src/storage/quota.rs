//! Per-client quotas of the snapshot repository (`docs/PROTOCOL.md`
//! §13.9): what a client is charged, its own setting, sizes as operators
//! write and read them.
//!
//! A client is charged the bytes of its packs as they lie on disk: a pack
//! counts in full from the transaction that records it until prune removes
//! or repacks it. Ids are scoped per client, so no object is shared between
//! clients and nothing is charged twice; an object the server already held
//! for the client is not sent again ("have"), so it costs nothing more.
//! A client's per-file versions (`--per-file`, the legacy listener) are
//! charged their plaintext bytes, as they are stored, from the
//! transaction that records them until retention, a deletion or prune
//! removes them.

use std::time::SystemTime;

use protocol::ClientId;

use super::StorageError;

/// A client's own quota, as `backup-server quota CLIENT` sets it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum QuotaSetting {
    /// None of its own: the server's configuration applies (`quota` of
    /// its `[clients.NAME]` table, else the global `quota`).
    #[default]
    Inherit,
    /// No quota, whatever the configuration says.
    Unlimited,
    /// At most this many bytes.
    Bytes(u64),
}

impl QuotaSetting {
    /// The quota in force, given what the configuration gives the client
    /// (`None`: no quota).
    pub fn effective(self, configured: Option<u64>) -> Option<u64> {
        match self {
            Self::Inherit => configured,
            Self::Unlimited => None,
            Self::Bytes(n) => Some(n),
        }
    }
}

/// What a client stores against its quota.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QuotaUsage {
    /// Bytes of the client's packs.
    pub stored: u64,
    /// The quota in force, `None` for none.
    pub quota: Option<u64>,
}

impl QuotaUsage {
    /// Whether `size` more bytes fit: exactly at the quota fits, one byte
    /// over does not.
    pub fn fits(&self, size: u64) -> bool {
        self.quota
            .is_none_or(|q| self.stored.checked_add(size).is_some_and(|t| t <= q))
    }

    /// The rule of a per-file version of `size` bytes (`docs/PROTOCOL.md`
    /// §13.9), given what the client stored `before` it was recorded and
    /// `after` (with the versions its retention drops gone): it fits
    /// unless it leaves the client above its quota and storing more than
    /// before. So exactly at the quota fits, one byte over does not, and
    /// a new version that replaces a larger one under retention always
    /// fits, even for a client already over a lowered quota.
    ///
    /// # Errors
    /// [`StorageError::QuotaExceeded`] when it does not fit.
    pub fn admits(before: Self, after: Self, size: u64) -> Result<(), StorageError> {
        match after.quota {
            Some(quota) if after.stored > quota && after.stored > before.stored => {
                Err(StorageError::QuotaExceeded {
                    stored: before.stored,
                    quota,
                    size,
                })
            }
            _ => Ok(()),
        }
    }
}

/// A client's snapshot repository as the operator's views show it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RepoUsage {
    pub client: ClientId,
    /// Bytes of its packs (what its quota is charged).
    pub stored: u64,
    pub packs: u64,
    pub snapshots: u64,
    /// Over its snapshots, the sealed sizes of the objects each references:
    /// an object referenced by three snapshots counts three times.
    pub logical: u64,
    /// When its newest snapshot was committed (server time).
    pub last_snapshot: Option<SystemTime>,
}

/// One snapshot as `backup-server snapshots CLIENT` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotUsage {
    pub id: u64,
    /// The time the client gave it (Unix seconds).
    pub time: u64,
    /// When the server committed it.
    pub committed_at: SystemTime,
    /// Objects it references.
    pub objects: u64,
    /// Their sealed bytes.
    pub logical: u64,
    /// Sealed bytes of the objects no other snapshot references: what
    /// forgetting it alone would let prune reclaim.
    pub unique: u64,
}

/// Parses a size: a number of bytes, or a number with a binary unit (`K`,
/// `M`, `G`, `T`, `P`, optionally followed by `iB` or `B`, any case):
/// `1048576`, `500M`, `50G`, `1.5GiB`.
///
/// # Errors
/// When the text is not such a size, or it does not fit 64 bits.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let unit = unit.trim();
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        "p" | "pb" | "pib" => 50,
        _ => {
            return Err(format!(
                "{text:?} is not a size: use bytes or a number with K, M, G, T or P (binary units, e.g. 50G)"
            ))
        }
    };
    let too_large = || format!("{text:?} is too large");
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() {
        return Err(format!("{text:?} is not a size: it has no number"));
    }
    if fraction.contains('.') || (shift == 0 && !fraction.is_empty()) {
        return Err(format!("{text:?} is not a whole number of bytes"));
    }
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| too_large())?
    };
    let mut bytes = whole.checked_shl(shift).filter(|b| b >> shift == whole);
    if !fraction.is_empty() {
        // Decimal digits of the fraction, at most 9 of them, in units.
        let digits: String = fraction.chars().take(9).collect();
        let scale = 10u128.pow(u32::try_from(digits.len()).unwrap_or(9));
        let frac: u128 = digits.parse().map_err(|_| too_large())?;
        let part = u64::try_from((frac << shift) / scale).map_err(|_| too_large())?;
        bytes = bytes.and_then(|b| b.checked_add(part));
    }
    // The metadata keeps sizes as SQL integers (i64).
    bytes
        .filter(|b| i64::try_from(*b).is_ok())
        .ok_or_else(|| format!("{text:?} is too large (at most 8191P)"))
}

/// A size for people: bytes below 1 KiB, else one decimal in the largest
/// binary unit it reaches (`49.9 GiB`).
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS.get(unit).copied().unwrap_or("PiB"))
}

/// A size as [`parse_size`] reads it back exactly: the largest binary unit
/// that divides it, else bytes (`50G`, `1048577`).
pub fn format_exact(bytes: u64) -> String {
    for (shift, unit) in [(50, "P"), (40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if bytes != 0 && bytes.trailing_zeros() >= shift {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bytes_and_binary_units() {
        for (text, bytes) in [
            ("1048576", 1 << 20),
            ("0", 0),
            ("500M", 500 << 20),
            ("50G", 50 << 30),
            ("50g", 50 << 30),
            ("50GiB", 50 << 30),
            ("50 GB", 50 << 30),
            ("1.5G", 3 << 29),
            ("2T", 2 << 40),
            ("1K", 1024),
            ("7b", 7),
            ("0.5K", 512),
            ("8191P", 8191 << 50),
        ] {
            assert_eq!(parse_size(text), Ok(bytes), "{text}");
        }
        for bad in [
            "",
            "G",
            "-1",
            "5X",
            "1.5",
            "1..5G",
            "8192P",
            "16384P",
            "99999999999999999999",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn formats_sizes_for_people_and_exactly() {
        assert_eq!(format_size(0), "0 B");
        assert_eq!(format_size(1023), "1023 B");
        assert_eq!(format_size(1024), "1.0 KiB");
        assert_eq!(format_size(1536 << 20), "1.5 GiB");
        assert_eq!(format_size(u64::MAX), "16384.0 PiB");
        for n in [
            0u64,
            1,
            1023,
            1024,
            50 << 30,
            (50 << 30) + 1,
            3 << 29,
            i64::MAX as u64,
        ] {
            assert_eq!(parse_size(&format_exact(n)), Ok(n), "{n}");
        }
        assert_eq!(format_exact(50 << 30), "50G");
        assert_eq!(format_exact(3 << 29), "1536M");
    }

    #[test]
    fn fits_exactly_at_the_quota_and_not_one_byte_over() {
        let u = QuotaUsage {
            stored: 90,
            quota: Some(100),
        };
        assert!(u.fits(10));
        assert!(!u.fits(11));
        assert!(!u.fits(u64::MAX), "no overflow");
        assert!(QuotaUsage {
            stored: u64::MAX,
            quota: None
        }
        .fits(u64::MAX));
        assert_eq!(QuotaSetting::Inherit.effective(Some(5)), Some(5));
        assert_eq!(QuotaSetting::Unlimited.effective(Some(5)), None);
        assert_eq!(QuotaSetting::Bytes(7).effective(None), Some(7));
    }
}
