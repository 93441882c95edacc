//! Bad input: points (filled in by its change).
