//! Kubernetes resource quantities (`500m`, `1.5`, `15Gi`, `1e3`, `129M`) converted exactly.
//!
//! `k8s-openapi`'s `Quantity` is only a string; the cost engine needs numbers. The value is kept as
//! an integer mantissa with a decimal and a binary exponent so that `0.1` CPU is exactly 100
//! millicores (no float rounding), and conversions round up the way the kubelet does (`ceil`).

/// A quantity string that is not a valid Kubernetes quantity, or one that is negative or too
/// large for the unit asked for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    /// The text does not follow the quantity grammar (`<number><suffix>`).
    #[error(
        "{text:?} is not a Kubernetes quantity (expected a number with an optional suffix such as 500m, 2, 1.5Gi, 64M, 1e3)"
    )]
    Malformed {
        /// The rejected text.
        text: String,
    },
    /// The quantity is negative; resources cannot be.
    #[error("{text:?} is negative; resource quantities must be zero or more")]
    Negative {
        /// The rejected text.
        text: String,
    },
    /// The quantity does not fit the unit (more than 2^64 of it).
    #[error("{text:?} is too large")]
    TooLarge {
        /// The rejected text.
        text: String,
    },
}

/// A parsed quantity: `mantissa × 10^decimal_exponent × 2^binary_exponent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Parsed {
    mantissa: u128,
    decimal_exponent: i32,
    binary_exponent: u32,
}

fn parse(text: &str) -> Result<Parsed, QuantityError> {
    let malformed = || QuantityError::Malformed {
        text: text.to_string(),
    };
    let trimmed = text.trim();
    let (negative, rest) = match trimmed.as_bytes().first() {
        Some(b'-') => (true, &trimmed[1..]),
        Some(b'+') => (false, &trimmed[1..]),
        _ => (false, trimmed),
    };
    let number_end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    let (number, suffix) = rest.split_at(number_end);
    if number.is_empty() || number == "." || number.matches('.').count() > 1 {
        return Err(malformed());
    }
    let mut mantissa: u128 = 0;
    let mut decimal_exponent: i32 = 0;
    let mut after_point = false;
    let mut digits = 0usize;
    for c in number.chars() {
        if c == '.' {
            after_point = true;
            continue;
        }
        let digit = u128::from(c as u8 - b'0');
        // Leading zeros cost nothing; beyond 30 significant digits the value is not a resource.
        if mantissa != 0 || digit != 0 {
            digits += 1;
        }
        if digits > 30 {
            return Err(QuantityError::TooLarge {
                text: text.to_string(),
            });
        }
        mantissa = mantissa * 10 + digit;
        if after_point {
            decimal_exponent -= 1;
        }
    }
    let mut binary_exponent = 0u32;
    match suffix {
        "" => {}
        "n" => decimal_exponent -= 9,
        "u" => decimal_exponent -= 6,
        "m" => decimal_exponent -= 3,
        "k" => decimal_exponent += 3,
        "M" => decimal_exponent += 6,
        "G" => decimal_exponent += 9,
        "T" => decimal_exponent += 12,
        "P" => decimal_exponent += 15,
        "E" => decimal_exponent += 18,
        "Ki" => binary_exponent = 10,
        "Mi" => binary_exponent = 20,
        "Gi" => binary_exponent = 30,
        "Ti" => binary_exponent = 40,
        "Pi" => binary_exponent = 50,
        "Ei" => binary_exponent = 60,
        exponent if exponent.starts_with(['e', 'E']) => {
            let value: i32 = exponent[1..].parse().map_err(|_| malformed())?;
            if !(-30..=30).contains(&value) {
                return Err(malformed());
            }
            decimal_exponent += value;
        }
        _ => return Err(malformed()),
    }
    if negative && mantissa != 0 {
        return Err(QuantityError::Negative {
            text: text.to_string(),
        });
    }
    Ok(Parsed {
        mantissa,
        decimal_exponent,
        binary_exponent,
    })
}

/// The quantity in units of `10^-scale`, rounded up: `scale = 3` gives millis.
fn scaled_ceil(text: &str, scale: i32) -> Result<u64, QuantityError> {
    let parsed = parse(text)?;
    let too_large = || QuantityError::TooLarge {
        text: text.to_string(),
    };
    let numerator = parsed
        .mantissa
        .checked_mul(1u128 << parsed.binary_exponent)
        .ok_or_else(too_large)?;
    let exponent = parsed.decimal_exponent + scale;
    let value = if exponent >= 0 {
        let factor = 10u128
            .checked_pow(exponent.unsigned_abs())
            .ok_or_else(too_large)?;
        numerator.checked_mul(factor).ok_or_else(too_large)?
    } else {
        match 10u128.checked_pow(exponent.unsigned_abs()) {
            Some(divisor) => numerator.div_ceil(divisor),
            // 10^39 and beyond exceeds u128: any non-zero mantissa rounds up to 1.
            None => u128::from(numerator != 0),
        }
    };
    u64::try_from(value).map_err(|_| too_large())
}

/// A CPU quantity in millicores, rounded up (`"0.5"` → 500, `"250m"` → 250, `"1u"` → 1).
pub fn cpu_millis(text: &str) -> Result<u64, QuantityError> {
    scaled_ceil(text, 3)
}

/// A memory or storage quantity in bytes, rounded up (`"15Gi"` → 16106127360).
pub fn bytes(text: &str) -> Result<u64, QuantityError> {
    scaled_ceil(text, 0)
}

/// A countable quantity such as `nvidia.com/gpu`, rounded up.
pub fn count(text: &str) -> Result<u64, QuantityError> {
    scaled_ceil(text, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_forms() {
        assert_eq!(cpu_millis("500m"), Ok(500));
        assert_eq!(cpu_millis("0.5"), Ok(500));
        assert_eq!(cpu_millis("0.1"), Ok(100));
        assert_eq!(cpu_millis("2"), Ok(2000));
        assert_eq!(cpu_millis("1u"), Ok(1));
        assert_eq!(cpu_millis("1e3"), Ok(1_000_000));
        assert_eq!(cpu_millis("+1.25"), Ok(1250));
        assert_eq!(cpu_millis("0"), Ok(0));
        assert_eq!(cpu_millis("-0"), Ok(0));
    }

    #[test]
    fn memory_forms() {
        assert_eq!(bytes("15Gi"), Ok(15 * 1024 * 1024 * 1024));
        assert_eq!(bytes("128974848"), Ok(128_974_848));
        assert_eq!(bytes("129M"), Ok(129_000_000));
        assert_eq!(bytes("1.5Ki"), Ok(1536));
        assert_eq!(bytes("0.5"), Ok(1));
        assert_eq!(bytes("1E"), Ok(1_000_000_000_000_000_000));
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["", "abc", "1.2.3", "5X", "Gi", "1e", "1e99", "1 Gi", "."] {
            assert!(
                matches!(bytes(bad), Err(QuantityError::Malformed { .. })),
                "{bad:?} → {:?}",
                bytes(bad)
            );
        }
        assert!(matches!(bytes("-1"), Err(QuantityError::Negative { .. })));
        assert!(matches!(
            bytes("100Ei"),
            Err(QuantityError::TooLarge { .. })
        ));
    }
}
