//! Integer fields as JSON Schema reads them: `3.0` is an integer too, so a
//! schema-valid body is never refused for how a number was written.

use std::fmt;

use serde::de::{self, Deserializer, Visitor};

struct Integer {
    max: u64,
}

impl<'de> Visitor<'de> for Integer {
    type Value = Option<u64>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "an integer in 0..={}", self.max)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        if v <= self.max {
            Ok(Some(v))
        } else {
            Err(E::invalid_value(de::Unexpected::Unsigned(v), &self))
        }
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        match u64::try_from(v) {
            Ok(v) => self.visit_u64(v),
            Err(_) => Err(E::invalid_value(de::Unexpected::Signed(v), &self)),
        }
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        // Integral and in range. `max as f64` may round up (u64::MAX is 2^64
        // as an f64), so the bound is checked on the value converted back.
        let in_range = (0.0..18_446_744_073_709_551_616.0).contains(&v) && (v as u64) <= self.max;
        if v.fract() == 0.0 && in_range {
            Ok(Some(v as u64))
        } else {
            Err(E::invalid_value(de::Unexpected::Float(v), &self))
        }
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
}

/// An optional `u32` (`null` or absent is `None`); use with `#[serde(default)]`.
pub fn option_u32<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    let v = d.deserialize_any(Integer {
        max: u32::MAX.into(),
    })?;
    Ok(v.map(|v| v as u32))
}

/// An optional `u64`; use with `#[serde(default)]`.
pub fn option_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    d.deserialize_any(Integer { max: u64::MAX })
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    struct Fields {
        #[serde(default, deserialize_with = "super::option_u32")]
        small: Option<u32>,
        #[serde(default, deserialize_with = "super::option_u64")]
        big: Option<u64>,
    }

    fn parse(json: &str) -> Result<(Option<u32>, Option<u64>), String> {
        serde_json::from_str::<Fields>(json)
            .map(|f| (f.small, f.big))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn integers_as_json_schema_reads_them() {
        assert_eq!(parse("{}"), Ok((None, None)));
        assert_eq!(parse(r#"{"small": null, "big": null}"#), Ok((None, None)));
        assert_eq!(
            parse(r#"{"small": 7, "big": 18446744073709551615}"#),
            Ok((Some(7), Some(u64::MAX)))
        );
        assert_eq!(
            parse(r#"{"small": 21594.0, "big": 1e3}"#),
            Ok((Some(21594), Some(1000)))
        );
        for bad in [
            r#"{"small": -1}"#,
            r#"{"small": 1.5}"#,
            r#"{"small": 4294967296}"#,
            r#"{"small": "3"}"#,
            r#"{"small": true}"#,
            r#"{"big": -1e3}"#,
            r#"{"big": 1e300}"#,
            r#"{"big": 18446744073709552001}"#,
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains("expected an integer in 0..="), "{bad}: {e}");
        }
    }
}
