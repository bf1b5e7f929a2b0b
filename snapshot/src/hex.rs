//! The compact serde form of kvm-bindings' plain-data structs in a state: the struct's
//! bytes, less trailing zeros, as one lowercase hex string in JSON (format versions 2 and
//! earlier) or as they are in the binary form (version 3; serde's `is_human_readable`
//! tells the two apart).
//!
//! kvm-bindings serializes its structs as byte strings, which JSON writes as arrays of
//! numbers: a vCPU's xsave area alone became 4096 numbers, and a whole state 42 KB of
//! them that took milliseconds to write and parse under nested virtualization, inside the
//! migration's downtime. Hex is a table lookup per byte each way, and trailing zero bytes
//! are left out (most of an xsave area is zeros): kvm-bindings' deserializer pads a short
//! byte string with zeros, so nothing is lost. A string longer than the struct is refused.
//!
//! Reading also takes the array form that format version 1 wrote, so older snapshots
//! still load. Either way the bytes go through kvm-bindings' own `Deserialize`, which pads
//! or truncates to the struct's size exactly as it did before.

use std::fmt;
use std::marker::PhantomData;

use serde::de::value::{BytesDeserializer, SeqAccessDeserializer};
use serde::de::{self, DeserializeOwned, Deserializer, SeqAccess, Visitor};
use serde::ser::Serializer;
use serde::{Deserialize, Serialize};
use zerocopy::{Immutable, IntoBytes};

const DIGITS: &[u8; 16] = b"0123456789abcdef";

/// Lowercase hex of `bytes`.
fn encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

/// The bytes of a hex string; the error names the first bad character.
fn decode(text: &str) -> Result<Vec<u8>, String> {
    let digits = text.as_bytes();
    if !digits.len().is_multiple_of(2) {
        return Err(format!("odd number of hex digits ({})", digits.len()));
    }
    let nibble = |at: usize| -> Result<u8, String> {
        let c = digits[at];
        match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'a'..=b'f' => Ok(c - b'a' + 10),
            b'A'..=b'F' => Ok(c - b'A' + 10),
            _ => Err(format!(
                "{:?} at offset {at} is not a hex digit",
                char::from(c)
            )),
        }
    };
    (0..digits.len() / 2)
        .map(|i| Ok(nibble(2 * i)? << 4 | nibble(2 * i + 1)?))
        .collect()
}

/// Accepts a hex string (format 2), an array of byte values (format 1) or, in the binary
/// form (`.0`), bytes (format 3), and hands the bytes to `T`'s own deserializer.
struct HexVisitor<T>(bool, PhantomData<T>);

/// `T` from at most `size_of::<T>()` bytes.
fn from_bytes<T: DeserializeOwned, E: de::Error>(bytes: &[u8]) -> Result<T, E> {
    if bytes.len() > std::mem::size_of::<T>() {
        return Err(E::custom(format!(
            "{} bytes for a {}-byte {}",
            bytes.len(),
            std::mem::size_of::<T>(),
            std::any::type_name::<T>()
        )));
    }
    T::deserialize(BytesDeserializer::<E>::new(bytes))
}

impl<'de, T: DeserializeOwned> Visitor<'de> for HexVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(if self.0 {
            "the bytes of a kvm-bindings struct"
        } else {
            "a hex string or an array of byte values"
        })
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<T, E> {
        from_bytes(&decode(text).map_err(E::custom)?)
    }

    fn visit_bytes<E: de::Error>(self, bytes: &[u8]) -> Result<T, E> {
        from_bytes(bytes)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<T, A::Error> {
        T::deserialize(SeqAccessDeserializer::new(seq))
    }
}

/// `#[serde(with = "crate::hex")]` for one kvm-bindings struct.
pub fn serialize<T: IntoBytes + Immutable, S: Serializer>(
    value: &T,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    let bytes = value.as_bytes();
    let used = bytes
        .iter()
        .rposition(|&b| b != 0)
        .map_or(0, |last| last + 1);
    if serializer.is_human_readable() {
        serializer.serialize_str(&encode(&bytes[..used]))
    } else {
        serializer.serialize_bytes(&bytes[..used])
    }
}

/// See [`serialize`].
pub fn deserialize<'de, T: DeserializeOwned, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<T, D::Error> {
    if deserializer.is_human_readable() {
        deserializer.deserialize_any(HexVisitor(false, PhantomData))
    } else {
        deserializer.deserialize_bytes(HexVisitor(true, PhantomData))
    }
}

/// One element of a [`vec`] field.
struct Item<T>(T);

impl<T: IntoBytes + Immutable> Serialize for Item<&T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serialize(self.0, serializer)
    }
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for Item<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize(deserializer).map(Item)
    }
}

/// `#[serde(with = "crate::hex::vec")]` for a list of kvm-bindings structs: a list of hex
/// strings.
pub mod vec {
    use super::*;

    /// See the module.
    pub fn serialize<T: IntoBytes + Immutable, S: Serializer>(
        values: &[T],
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(values.iter().map(Item))
    }

    /// See the module.
    pub fn deserialize<'de, T: DeserializeOwned, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<T>, D::Error> {
        let items: Vec<Item<T>> = Vec::deserialize(deserializer)?;
        Ok(items.into_iter().map(|i| i.0).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::{kvm_msr_entry, kvm_regs};

    #[derive(Serialize, Deserialize)]
    struct Holder {
        #[serde(with = "crate::hex")]
        regs: kvm_regs,
        #[serde(with = "crate::hex::vec")]
        msrs: Vec<kvm_msr_entry>,
    }

    fn sample() -> Holder {
        let regs = kvm_regs {
            rip: 0xffff_ffff_8100_0000,
            rax: 0x1234,
            rflags: 2,
            ..Default::default()
        };
        let msrs = vec![
            kvm_msr_entry {
                index: 0x10,
                data: 0xdead_beef,
                ..Default::default()
            },
            kvm_msr_entry {
                index: 0xc000_0080,
                data: 0xd01,
                ..Default::default()
            },
        ];
        Holder { regs, msrs }
    }

    #[test]
    fn round_trips_as_hex_strings() {
        let json = serde_json::to_string(&sample()).unwrap();
        assert!(json.starts_with("{\"regs\":\""), "{json}");
        assert!(json.contains("\"msrs\":[\"10000000"), "{json}");
        let zero = serde_json::to_string(&Holder {
            regs: Default::default(),
            msrs: vec![Default::default()],
        })
        .unwrap();
        assert_eq!(
            zero, r#"{"regs":"","msrs":[""]}"#,
            "trailing zeros are left out"
        );
        let back: Holder = serde_json::from_str(&json).unwrap();
        assert_eq!(back.regs.rip, 0xffff_ffff_8100_0000);
        assert_eq!(back.regs.rax, 0x1234);
        assert_eq!(back.msrs.len(), 2);
        assert_eq!(back.msrs[1].index, 0xc000_0080);
        assert_eq!(back.msrs[1].data, 0xd01);
    }

    #[test]
    fn reads_the_number_arrays_of_format_1() {
        let s = sample();
        // What kvm-bindings' own Serialize wrote into format 1 states.
        let old = serde_json::json!({ "regs": s.regs, "msrs": s.msrs });
        assert!(old["regs"].is_array());
        let back: Holder = serde_json::from_value(old).unwrap();
        assert_eq!(back.regs.rip, s.regs.rip);
        assert_eq!(back.msrs[0].data, 0xdead_beef);
    }

    #[test]
    fn bad_hex_is_named() {
        let bad = r#"{"regs":"0g","msrs":[]}"#;
        let err = serde_json::from_str::<Holder>(bad)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("'g' at offset 1 is not a hex digit"), "{err}");
        let odd = r#"{"regs":"abc","msrs":[]}"#;
        let err = serde_json::from_str::<Holder>(odd)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("odd number of hex digits (3)"), "{err}");
        let long = format!(r#"{{"regs":"{}","msrs":[]}}"#, "00".repeat(145));
        let err = serde_json::from_str::<Holder>(&long)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("145 bytes for a 144-byte"), "{err}");
        let number = r#"{"regs":7,"msrs":[]}"#;
        let err = serde_json::from_str::<Holder>(number)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("a hex string or an array of byte values"),
            "{err}"
        );
    }

    #[test]
    fn binary_form_is_the_bytes() {
        let holder = sample();
        let bytes = postcard::to_stdvec(&holder).unwrap();
        // regs: a length (a two-byte varint) and the bytes up to rflags's, the last
        // non-zero one.
        let used = std::mem::offset_of!(kvm_regs, rflags) + 1;
        assert_eq!(bytes[..2], [0x80 | (used & 0x7f) as u8, (used >> 7) as u8]);
        assert_eq!(bytes[2..2 + used], holder.regs.as_bytes()[..used]);
        let back: Holder = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back.regs.rip, holder.regs.rip);
        assert_eq!(back.msrs[1].data, 0xd01);
        // One byte more than the struct: named, not truncated.
        let mut long = vec![145, 1];
        long.extend_from_slice(&[0; 145]);
        let err = postcard::from_bytes::<Holder>(&long).err().unwrap();
        assert!(matches!(err, postcard::Error::SerdeDeCustom), "{err}");
    }
}
