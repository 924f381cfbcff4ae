//! Kubernetes resource quantities (`500m`, `1.5`, `15Gi`, `1e3`, `129M`), parsed once and
//! converted exactly.
//!
//! `k8s-openapi`'s `Quantity` is only the string; the node (downward API, capacity), the
//! cells provider (sizing cells) and the agent (cgroup limits) need numbers. The grammar is
//! Kubernetes' (`k8s.io/apimachinery/pkg/api/resource`):
//!
//! ```text
//! <quantity>        ::= <signedNumber><suffix>
//! <signedNumber>    ::= <number> | <sign><number>
//! <number>          ::= <digits> | <digits>.<digits> | <digits>. | .<digits>
//! <sign>            ::= "+" | "-"
//! <suffix>          ::= <binarySI> | <decimalExponent> | <decimalSI>
//! <binarySI>        ::= Ki | Mi | Gi | Ti | Pi | Ei
//! <decimalSI>       ::= n | u | m | "" | k | M | G | T | P | E
//! <decimalExponent> ::= "e" <integer> | "E" <integer>     (a sign allowed: 1.3E+6, 1E-3)
//! ```
//!
//! As in Kubernetes the value is never a float: a [`Quantity`] is an integer number of
//! billionths. A finer value is rounded up, away from zero, to the next billionth (`0.1n` is
//! `1n`: "if you want some resources, you should get some"), and a value with a binary suffix
//! is capped at 2^63-1. The conversions round up away from zero as Kubernetes' `ScaledValue`
//! does: [`Quantity::to_milli`] is its `MilliValue` (what the kubelet uses for CPU),
//! [`Quantity::to_units`] its `Value` (bytes of memory and storage, a count of GPUs).
//!
//! Where this parser differs from Kubernetes', on purpose:
//! - Surrounding whitespace is trimmed. Kubernetes trims it when it decodes a quantity from
//!   JSON or YAML, which is where ours come from (objects and config files); only its
//!   `ParseQuantity` on a bare string refuses it.
//! - A number needs a digit, as the grammar says. Go's scanner lets `.`, `-` or a bare `Gi`
//!   through as zero; the API server never sends those (it stores quantities in canonical
//!   form, where zero is `0`), so here they are refused as malformed.
//! - Magnitudes from 10^29 up, or with more than 38 significant digits, are refused as too
//!   large; Kubernetes' arbitrary-precision decimals would hold them, but no resource is one.

use std::str::FromStr;

/// A text that is not a Kubernetes quantity, or one that does not fit what it is used for.
/// Every message names the text.
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
    /// The quantity is negative where a resource amount must be zero or more.
    #[error("{text:?} is negative; resource quantities must be zero or more")]
    Negative {
        /// The rejected text.
        text: String,
    },
    /// The quantity is too large to hold, or for the unit asked for.
    #[error("{text:?} is too large")]
    TooLarge {
        /// The rejected text.
        text: String,
    },
}

/// Billionths in one unit: the finest a quantity resolves (Kubernetes' `Nano` scale).
const NANOS_PER_UNIT: i128 = 1_000_000_000;

/// The cap of a binary-suffixed quantity, 2^63-1 units (Kubernetes' `maxAllowed`), in nanos.
const BINARY_CAP_NANOS: u128 = i64::MAX as u128 * NANOS_PER_UNIT as u128;

/// A parsed quantity: an exact number of billionths of a unit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Quantity {
    nanos: i128,
}

impl Quantity {
    /// Zero.
    pub const ZERO: Quantity = Quantity { nanos: 0 };

    /// Parses `text` by Kubernetes' grammar (see the module docs for the few differences).
    pub fn parse(text: &str) -> Result<Self, QuantityError> {
        let malformed = || QuantityError::Malformed {
            text: text.to_owned(),
        };
        let too_large = || QuantityError::TooLarge {
            text: text.to_owned(),
        };
        let trimmed = text.trim();
        let (negative, signless) = match trimmed.as_bytes().first() {
            Some(b'-') => (true, &trimmed[1..]),
            Some(b'+') => (false, &trimmed[1..]),
            _ => (false, trimmed),
        };
        let number_len = signless
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(signless.len());
        let (number, suffix) = signless.split_at(number_len);
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        if fraction.contains('.') || (whole.is_empty() && fraction.is_empty()) {
            return Err(malformed());
        }
        let (suffix_exponent, binary_exponent): (i128, u32) = match suffix {
            "" => (0, 0),
            "n" => (-9, 0),
            "u" => (-6, 0),
            "m" => (-3, 0),
            "k" => (3, 0),
            "M" => (6, 0),
            "G" => (9, 0),
            "T" => (12, 0),
            "P" => (15, 0),
            "E" => (18, 0),
            "Ki" => (0, 10),
            "Mi" => (0, 20),
            "Gi" => (0, 30),
            "Ti" => (0, 40),
            "Pi" => (0, 50),
            "Ei" => (0, 60),
            exponent if exponent.starts_with(['e', 'E']) => {
                let value: i64 = exponent[1..].parse().map_err(|_| malformed())?;
                (i128::from(value), 0)
            }
            _ => return Err(malformed()),
        };
        // value = digits × 10^decimal_exponent × 2^binary_exponent, digits without the zeros
        // that do not change it.
        let digits = format!("{whole}{fraction}");
        let significant = digits.trim_start_matches('0');
        let mantissa_digits = significant.trim_end_matches('0');
        if mantissa_digits.is_empty() {
            return Ok(Self::ZERO);
        }
        let trailing_zeros = significant.len() - mantissa_digits.len();
        let decimal_exponent = suffix_exponent - fraction.len() as i128 + trailing_zeros as i128;
        // u128 holds every 38-digit number.
        if mantissa_digits.len() > 38 {
            return Err(too_large());
        }
        let mantissa: u128 = mantissa_digits.parse().map_err(|_| malformed())?;
        let mantissa = mantissa
            .checked_mul(1u128 << binary_exponent)
            .ok_or_else(too_large)?;
        // In billionths, rounded up (away from zero: the sign is applied last).
        let nanos_exponent = decimal_exponent + 9;
        let mut nanos = if nanos_exponent >= 0 {
            u32::try_from(nanos_exponent)
                .ok()
                .and_then(|exponent| 10u128.checked_pow(exponent))
                .and_then(|factor| mantissa.checked_mul(factor))
                .ok_or_else(too_large)?
        } else {
            match u32::try_from(-nanos_exponent)
                .ok()
                .and_then(|exponent| 10u128.checked_pow(exponent))
            {
                Some(divisor) => mantissa.div_ceil(divisor),
                // Below 10^-38 of a billionth: any non-zero value rounds up to one.
                None => 1,
            }
        };
        if binary_exponent > 0 {
            nanos = nanos.min(BINARY_CAP_NANOS);
        }
        let nanos = i128::try_from(nanos).map_err(|_| too_large())?;
        Ok(Self {
            nanos: if negative { -nanos } else { nanos },
        })
    }

    /// The quantity of exactly `nanos` billionths of a unit.
    pub fn from_nanos(nanos: i128) -> Self {
        Self { nanos }
    }

    /// The exact value in billionths of a unit (`"250m"` → 250 000 000).
    pub fn nanos(self) -> i128 {
        self.nanos
    }

    /// Whether the quantity is below zero.
    pub fn is_negative(self) -> bool {
        self.nanos < 0
    }

    /// Whether the quantity is zero.
    pub fn is_zero(self) -> bool {
        self.nanos == 0
    }

    /// Thousandths, rounded up away from zero: CPU in millicores (`"0.5"` → 500, `"1u"` → 1),
    /// as Kubernetes' `MilliValue`.
    pub fn to_milli(self) -> i128 {
        div_away_from_zero(self.nanos, NANOS_PER_UNIT / 1000)
    }

    /// Whole units, rounded up away from zero: bytes of memory or storage (`"15Gi"`,
    /// `"0.5"` → 1), a count of GPUs, as Kubernetes' `Value`.
    pub fn to_units(self) -> i128 {
        div_away_from_zero(self.nanos, NANOS_PER_UNIT)
    }

    /// The value as a float, for arithmetic where exactness does not matter (rates, sums
    /// shown to people).
    pub fn to_f64(self) -> f64 {
        self.nanos as f64 / NANOS_PER_UNIT as f64
    }
}

impl FromStr for Quantity {
    type Err = QuantityError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::parse(text)
    }
}

/// `numerator / divisor` rounded away from zero (`divisor` positive).
fn div_away_from_zero(numerator: i128, divisor: i128) -> i128 {
    let quotient = numerator / divisor;
    match (numerator % divisor).signum() {
        1 => quotient + 1,
        -1 => quotient - 1,
        _ => quotient,
    }
}

/// A resource amount in `convert`'s unit: zero or more, fitting a `u64`.
fn amount(text: &str, convert: fn(Quantity) -> i128) -> Result<u64, QuantityError> {
    let quantity = Quantity::parse(text)?;
    if quantity.is_negative() {
        return Err(QuantityError::Negative {
            text: text.to_owned(),
        });
    }
    u64::try_from(convert(quantity)).map_err(|_| QuantityError::TooLarge {
        text: text.to_owned(),
    })
}

/// A CPU amount in millicores, rounded up (`"0.5"` → 500, `"250m"` → 250, `"1u"` → 1).
pub fn cpu_millis(text: &str) -> Result<u64, QuantityError> {
    amount(text, Quantity::to_milli)
}

/// A memory or storage amount in bytes, rounded up (`"15Gi"` → 16 106 127 360).
pub fn bytes(text: &str) -> Result<u64, QuantityError> {
    amount(text, Quantity::to_units)
}

/// A countable amount such as `nvidia.com/gpu`, rounded up.
pub fn count(text: &str) -> Result<u64, QuantityError> {
    amount(text, Quantity::to_units)
}

#[cfg(test)]
mod tests {
    use super::*;

    const UNIT: i128 = NANOS_PER_UNIT;

    fn nanos(text: &str) -> i128 {
        match Quantity::parse(text) {
            Ok(quantity) => quantity.nanos(),
            Err(error) => unreachable!("{text:?}: {error}"),
        }
    }

    /// The parse table of Kubernetes' `TestQuantityParse` (apimachinery `quantity_test.go`),
    /// each value in billionths; every row is also checked negated and with an explicit `+`.
    #[test]
    fn parses_as_kubernetes_does() {
        let ki = 1024 * UNIT;
        let table: &[(&str, i128)] = &[
            ("0", 0),
            ("0n", 0),
            ("0u", 0),
            ("0m", 0),
            ("0Ki", 0),
            ("0k", 0),
            ("0Mi", 0),
            ("0M", 0),
            ("0Gi", 0),
            ("0G", 0),
            ("0Ti", 0),
            ("0T", 0),
            // Quantity-less numbers.
            ("1", UNIT),
            // Binary suffixes.
            ("1Ki", ki),
            ("8Ki", 8 * ki),
            ("7Mi", 7 * (1 << 20) * UNIT),
            ("6Gi", 6 * (1 << 30) * UNIT),
            ("5Ti", 5 * (1 << 40) * UNIT),
            ("4Pi", 4 * (1 << 50) * UNIT),
            ("3Ei", 3 * (1 << 60) * UNIT),
            ("10Ti", 10 * (1 << 40) * UNIT),
            ("100Ti", 100 * (1 << 40) * UNIT),
            // Decimal suffixes.
            ("5n", 5),
            ("4u", 4_000),
            ("3m", 3_000_000),
            ("9", 9 * UNIT),
            ("8k", 8_000 * UNIT),
            ("50k", 50_000 * UNIT),
            ("7M", 7_000_000 * UNIT),
            ("6G", 6_000_000_000 * UNIT),
            ("5T", 5 * 10i128.pow(12) * UNIT),
            ("40T", 40 * 10i128.pow(12) * UNIT),
            ("300T", 300 * 10i128.pow(12) * UNIT),
            ("2P", 2 * 10i128.pow(15) * UNIT),
            ("1E", 10i128.pow(18) * UNIT),
            // Decimal exponents.
            ("1E-3", 1_000_000),
            ("1e3", 1_000 * UNIT),
            ("1E6", 1_000_000 * UNIT),
            ("1e9", 10i128.pow(9) * UNIT),
            ("1E12", 10i128.pow(12) * UNIT),
            ("1e15", 10i128.pow(15) * UNIT),
            ("1E18", 10i128.pow(18) * UNIT),
            // Nonstandard but still parsable.
            ("1e14", 10i128.pow(14) * UNIT),
            ("1e13", 10i128.pow(13) * UNIT),
            ("100.035k", 100_035 * UNIT),
            // Things that look like floating point.
            ("0.001", 1_000_000),
            ("0.0005k", UNIT / 2),
            ("0.005", 5_000_000),
            ("0.05", 50_000_000),
            ("0.5", UNIT / 2),
            ("0.00050k", UNIT / 2),
            ("0.00500", 5_000_000),
            ("0.05000", 50_000_000),
            ("0.50000", UNIT / 2),
            ("0.5e0", UNIT / 2),
            ("0.5e-1", 50_000_000),
            ("0.5e-2", 5_000_000),
            ("10.035M", 10_035_000 * UNIT),
            ("1.2e3", 1_200 * UNIT),
            ("1.3E+6", 1_300_000 * UNIT),
            ("1.40e9", 1_400_000_000 * UNIT),
            ("1.53E12", 153 * 10i128.pow(10) * UNIT),
            ("1.6e15", 16 * 10i128.pow(14) * UNIT),
            ("1.7E18", 17 * 10i128.pow(17) * UNIT),
            ("9.01", 9_010_000_000),
            ("8.1k", 8_100 * UNIT),
            ("7.123456M", 7_123_456 * UNIT),
            ("6.987654321G", 6_987_654_321 * UNIT),
            ("5.444T", 5_444 * 10i128.pow(9) * UNIT),
            ("40.1T", 401 * 10i128.pow(11) * UNIT),
            ("300.2T", 3_002 * 10i128.pow(11) * UNIT),
            ("2.5P", 25 * 10i128.pow(14) * UNIT),
            ("1.01E", 101 * 10i128.pow(16) * UNIT),
            // Things that saturate or round (up, to a billionth).
            ("3.001n", 4),
            ("1.1E-9", 2),
            ("0.0000000001", 1),
            ("0.0000000005", 1),
            ("0.00000000050", 1),
            ("0.5e-9", 1),
            ("0.9n", 1),
            ("0.00000012345", 124),
            ("0.00000012354", 124),
            ("9Ei", i128::from(i64::MAX) * UNIT),
            ("9223372036854775807Ki", i128::from(i64::MAX) * UNIT),
            ("12E", 12 * 10i128.pow(18) * UNIT),
            // Fractional binary values.
            ("100.035Ki", 102_435_840_000_000),
            ("0.5Mi", 524_288 * UNIT),
            ("0.05Gi", 53_687_091_200_000_000),
            ("0.025Ti", 27_487_790_694_400_000_000),
            // "Things written by trolls".
            ("0.000000000001Ki", 2),
            (".001", 1_000_000),
            (".0001k", UNIT / 10),
            ("1.", UNIT),
            ("1.G", 10i128.pow(9) * UNIT),
        ];
        for &(text, expected) in table {
            assert_eq!(nanos(text), expected, "{text:?}");
            assert_eq!(nanos(&format!("-{text}")), -expected, "-{text:?}");
            assert_eq!(nanos(&format!("+{text}")), expected, "+{text:?}");
        }
    }

    #[test]
    fn refuses_what_kubernetes_refuses() {
        // Kubernetes' invalid list, then what the grammar has no digit for.
        for text in [
            "",
            "1.1.M",
            "1+1.0M",
            "0.1mi",
            "0.1am",
            "aoeu",
            ".5i",
            "1i",
            "-3.01i",
            "-3.01e-",
            "1 Gi",
            "5X",
            "1e",
            "1E+",
            "1e3.5",
            "1ee3",
            "Non-Numeric",
            ".",
            "-",
            "+",
            "Gi",
            "-.",
        ] {
            assert_eq!(
                Quantity::parse(text),
                Err(QuantityError::Malformed { text: text.into() }),
                "{text:?}"
            );
        }
    }

    #[test]
    fn surrounding_whitespace_is_trimmed_as_in_decoded_objects() {
        assert_eq!(nanos(" 1"), UNIT);
        assert_eq!(nanos("1 "), UNIT);
        assert_eq!(nanos("\t-1\n"), -UNIT);
    }

    /// Kubernetes' `TestQuantityRoundUp` at scale 0 (`9.01` → 10, `-9.01` → -10) and the
    /// milli-values the kubelet uses for CPU.
    #[test]
    fn conversions_round_up_away_from_zero() {
        let q = |text: &str| Quantity::parse(text).unwrap_or_default();
        assert_eq!(q("9.01").to_units(), 10);
        assert_eq!(q("-9.01").to_units(), -10);
        assert_eq!(q("9").to_units(), 9);
        assert_eq!(q("0.5").to_units(), 1);
        assert_eq!(q("1.5Ki").to_units(), 1536);
        assert_eq!(q("0.1m").to_milli(), 1);
        assert_eq!(q("1u").to_milli(), 1);
        assert_eq!(q("-1u").to_milli(), -1);
        assert_eq!(q("0.1").to_milli(), 100);
        assert_eq!(q("2").to_milli(), 2000);
        assert_eq!(q("250m").to_f64(), 0.25);
        assert_eq!(q("1Gi").to_f64(), 1_073_741_824.0);
    }

    #[test]
    fn resource_amounts() {
        assert_eq!(cpu_millis("500m"), Ok(500));
        assert_eq!(cpu_millis("0.5"), Ok(500));
        assert_eq!(cpu_millis("1e3"), Ok(1_000_000));
        assert_eq!(cpu_millis("-0"), Ok(0));
        assert_eq!(bytes("15Gi"), Ok(15 << 30));
        assert_eq!(bytes("129M"), Ok(129_000_000));
        assert_eq!(bytes("1E"), Ok(1_000_000_000_000_000_000));
        assert_eq!(count("1"), Ok(1));
        assert_eq!(
            bytes("-1"),
            Err(QuantityError::Negative { text: "-1".into() })
        );
        assert_eq!(
            bytes("100E"),
            Err(QuantityError::TooLarge {
                text: "100E".into()
            })
        );
        assert_eq!(
            Quantity::parse("1e30"),
            Err(QuantityError::TooLarge {
                text: "1e30".into()
            })
        );
        // 1e-100 rounds up to a billionth, as Kubernetes rounds it.
        assert_eq!(nanos("1e-100"), 1);
    }

    #[test]
    fn the_error_names_the_text() {
        let error = bytes("lots").map(|_| ()).unwrap_err();
        assert!(error.to_string().contains("\"lots\""), "{error}");
    }
}
