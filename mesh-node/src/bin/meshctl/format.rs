//! Small text helpers for meshctl's tables.

use std::io::IsTerminal;

use comfy_table::{presets, ColumnConstraint, ContentArrangement, Table, Width};
use mesh_node::keys::ObjectKey;

/// Width tables wrap to when stdout is not a terminal.
pub const DEFAULT_WIDTH: u16 = 100;

/// A kubectl-like table (no borders, upper-case headers) that wraps to the terminal,
/// or to 100 columns when piped.
pub fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_style(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header.to_vec());
    let width = if std::io::stdout().is_terminal() {
        t.width().unwrap_or(DEFAULT_WIDTH)
    } else {
        DEFAULT_WIDTH
    };
    t.set_width(width);
    // kubectl's look: no left margin, two spaces between columns.
    for column in t.column_iter_mut() {
        column.set_padding((0, 2));
    }
    t
}

/// Keeps a column wide enough for a whole SPIFFE ID of `width` characters (plus the
/// column gap), so identities are not broken across lines.
pub fn keep_whole(t: &mut Table, column: usize, width: u16) {
    if let Some(c) = t.column_mut(column) {
        c.set_constraint(ColumnConstraint::LowerBoundary(Width::Fixed(width + 2)));
    }
}

/// The table's text without the padding comfy-table adds at the end of each line.
pub fn finish(t: &Table) -> String {
    t.lines()
        .map(|l| l.trim_end().to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

/// A text field, or `-` when it is empty.
pub fn text(v: &str) -> String {
    if v.is_empty() {
        "-".into()
    } else {
        v.to_string()
    }
}

/// An optional text field, or `-` when it is absent or empty.
pub fn opt_text(v: Option<&str>) -> String {
    v.map(text).unwrap_or_else(|| "-".into())
}

/// An optional value (a number, an address), or `-`.
pub fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

/// `namespace/name` of an object key (`name` alone for a cluster-scoped one).
pub fn key(k: &ObjectKey) -> String {
    k.to_string()
}

/// An optional object key, or `-`.
pub fn opt_key(k: Option<&ObjectKey>) -> String {
    k.map(key).unwrap_or_else(|| "-".into())
}

/// `1.5 KiB` style sizes.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// `45s`, `12m`, `3h4m`, `2d5h` like kubectl's AGE.
pub fn age(seconds: i64) -> String {
    let (sign, s) = if seconds < 0 {
        ("-", -seconds)
    } else {
        ("", seconds)
    };
    let text = match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{}h", s / 86_400, (s % 86_400) / 3600),
    };
    format!("{sign}{text}")
}

/// A Unix time as `YYYY-MM-DD HH:MM:SSZ` (UTC), via days-from-civil in reverse.
pub fn utc(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}Z",
        secs / 3600,
        (secs % 3600) / 60,
        secs % 60
    )
}

pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `spiffe://td/ns/apps/sa/client` stays whole: identities are what operators grep for.
pub fn identity(v: Option<&str>) -> String {
    opt_text(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_sizes_and_ages_read_like_kubectl() {
        assert_eq!(utc(0), "1970-01-01 00:00:00Z");
        assert_eq!(utc(1_795_000_000), "2026-11-18 11:06:40Z");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00Z");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1 << 20), "1.0 MiB");
        assert_eq!(age(59), "59s");
        assert_eq!(age(600), "10m");
        assert_eq!(age(3 * 3600 + 240), "3h4m");
        assert_eq!(age(-30), "-30s");
    }
}
