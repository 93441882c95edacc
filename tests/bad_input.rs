//! The bad-input suite (G6): every door (the publish API, the CLI, the SQL `inbox`, the file drop,
//! HTTP) and every table the engine reads, fed input that can never be stored or read. Each test
//! asserts that the bad item becomes a record with a reason, that the host stays alive, and that a
//! good instance started alongside completes; on each backend.

#![allow(clippy::unwrap_used)] // tests may unwrap: a panic is a failed test

mod support;

#[path = "bad_input/doors.rs"]
mod doors;
#[path = "bad_input/points.rs"]
mod points;
#[path = "bad_input/recovery.rs"]
mod recovery;
#[path = "bad_input/rows.rs"]
mod rows;
