//! Encoding of instance state (MessagePack via rmp-serde) and the readable step name.
//!
//! State is written with field names (`to_vec_named`), so that a new version of a definition can
//! add fields with `#[serde(default)]` and still read yesterday's state. The `step` column is the
//! name of the state's enum variant, read off the encoded bytes: rmp-serde writes a unit variant
//! as its name and any other variant as a one-entry map keyed by its name.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// State that does not encode or decode.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// Encoding failed (a type serde cannot write as MessagePack).
    #[error("state does not encode as MessagePack: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    /// The stored bytes are not a valid state of this definition (corrupt, or an incompatible
    /// version).
    #[error("stored state does not decode as {target}: {source}")]
    Decode {
        /// The Rust type asked for.
        target: &'static str,
        /// What rmp-serde said.
        #[source]
        source: rmp_serde::decode::Error,
    },
}

/// Encodes a state.
///
/// # Errors
/// [`CodecError::Encode`].
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    Ok(rmp_serde::to_vec_named(value)?)
}

/// Decodes a state.
///
/// # Errors
/// [`CodecError::Decode`] naming the type.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    rmp_serde::from_slice(bytes).map_err(|source| CodecError::Decode {
        target: std::any::type_name::<T>(),
        source,
    })
}

/// The step name of an encoded state: its enum variant's name, or `fallback` when the state is
/// not an enum.
pub fn step_name(bytes: &[u8], fallback: &str) -> String {
    let mut rd = bytes;
    let name = match rmp::decode::read_marker(&mut rd) {
        Ok(rmp::Marker::FixMap(1)) => read_str(rd),
        Ok(
            rmp::Marker::FixStr(_) | rmp::Marker::Str8 | rmp::Marker::Str16 | rmp::Marker::Str32,
        ) => read_str(bytes),
        _ => None,
    };
    name.unwrap_or_else(|| fallback.to_owned())
}

fn read_str(mut rd: &[u8]) -> Option<String> {
    let len = rmp::decode::read_str_len(&mut rd).ok()? as usize;
    let s = rd.get(..len)?;
    std::str::from_utf8(s).ok().map(str::to_owned)
}

/// Decodes any MessagePack value into JSON, for showing a state to a person.
///
/// # Errors
/// [`CodecError::Decode`].
pub fn to_json(bytes: &[u8]) -> Result<serde_json::Value, CodecError> {
    decode::<serde_json::Value>(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    enum State {
        Idle,
        Paying { order: u32, amount: f64 },
        Waiting(String),
    }

    #[test]
    fn step_name_is_the_variant_name_for_every_variant_shape() {
        for (state, name) in [
            (State::Idle, "Idle"),
            (
                State::Paying {
                    order: 1,
                    amount: 2.5,
                },
                "Paying",
            ),
            (State::Waiting("x".into()), "Waiting"),
        ] {
            let bytes = encode(&state).expect("encodes");
            assert_eq!(step_name(&bytes, "state"), name);
            assert_eq!(decode::<State>(&bytes).expect("decodes"), state);
        }
    }

    #[test]
    fn step_name_falls_back_for_non_enum_state() {
        #[derive(Serialize)]
        struct Plain {
            a: u32,
            b: u32,
        }
        let bytes = encode(&Plain { a: 1, b: 2 }).expect("encodes");
        assert_eq!(step_name(&bytes, "state"), "state");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// Whatever a tool wrote into `instances.state` or `engine_state`: decoding gives a
        /// value or an error, never a panic, and the step name is a name or the fallback.
        #[test]
        fn arbitrary_state_bytes_decode_to_a_value_or_an_error(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256),
        ) {
            let _ = decode::<State>(&bytes);
            let _ = decode::<crate::host::instance::Waits>(&bytes);
            let _ = to_json(&bytes);
            let _ = step_name(&bytes, "state");
        }

        /// A valid state with bytes flipped or cut off decodes to a value or an error.
        #[test]
        fn damaged_state_bytes_decode_to_a_value_or_an_error(
            order in proptest::prelude::any::<u32>(),
            cut in 0usize..64,
            flip in 0usize..64,
            with in proptest::prelude::any::<u8>(),
        ) {
            let mut bytes = encode(&State::Paying { order, amount: 1.5 }).expect("encodes");
            if let Some(b) = bytes.get_mut(flip) {
                *b ^= with;
            }
            bytes.truncate(cut);
            let _ = decode::<State>(&bytes);
            let _ = decode::<crate::host::instance::Waits>(&bytes);
            let _ = step_name(&bytes, "state");
        }
    }

    #[test]
    fn corrupt_bytes_give_a_decode_error_naming_the_type() {
        let err = decode::<State>(&[0xc1, 0xff, 0x00]).expect_err("corrupt");
        assert!(err.to_string().contains("State"), "{err}");
    }
}
