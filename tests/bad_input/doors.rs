//! Bad input: doors (filled in by its change).
