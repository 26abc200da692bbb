//! Sizes on the command line: `4096`, `4k`, `1M`, `2GiB`, `512b` (binary units).

/// Parse a size with an optional K/M/G/T suffix (powers of 1024; `KiB`, `KB` and `k`
/// all mean 1024). Used as a clap value parser.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(format!("`{s}` is not a size (examples: 4096, 4k, 1M, 2G)"));
    }
    let n: u64 = num.parse().map_err(|_| format!("`{s}` is too large"))?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (use K, M, G or T)")),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("`{s}` is too large"))
}

/// An offset or length: a size, where a negative number gets a plain message.
pub fn parse_offset(s: &str) -> Result<u64, String> {
    if s.trim().starts_with('-') {
        return Err(format!(
            "`{s}` is negative: offsets and lengths count bytes from the start, 0 or more"
        ));
    }
    parse_size(s)
}

/// A byte count for people: `4 KiB`, `1.5 MiB`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else if v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A short size label for workload names: `4k`, `1M`, `12288`.
pub fn short(bytes: u64) -> String {
    for (shift, unit) in [(30, "G"), (20, "M"), (10, "k")] {
        if bytes >= 1 << shift && bytes % (1 << shift) == 0 {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffixes_are_binary() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("512b"), Ok(512));
    }

    #[test]
    fn garbage_is_refused() {
        assert!(parse_size("").is_err());
        assert!(parse_size("k").is_err());
        assert!(parse_size("4q").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn labels() {
        assert_eq!(short(4096), "4k");
        assert_eq!(short(1 << 20), "1M");
        assert_eq!(short(1000), "1000");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(7), "7 B");
    }
}
