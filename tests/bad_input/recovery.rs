//! Bad input: recovery (filled in by its change).
