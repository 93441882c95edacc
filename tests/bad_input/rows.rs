//! Bad input: rows (filled in by its change).
