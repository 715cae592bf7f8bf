//! Packet views (placeholder).
