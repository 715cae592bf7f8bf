//! Maglev (placeholder).
