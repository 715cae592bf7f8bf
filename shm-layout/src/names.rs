//! Fixed-size, NUL-padded names in shared records.

/// Writes `s` into `dst`, truncated to fit, NUL-padded.
pub fn set(dst: &mut [u8], s: &str) {
    dst.fill(0);
    let n = s.len().min(dst.len());
    dst[..n].copy_from_slice(&s.as_bytes()[..n]);
}

/// Reads a NUL-padded name; invalid UTF-8 reads as `"?"`.
pub fn get(src: &[u8]) -> &str {
    let end = src.iter().position(|&b| b == 0).unwrap_or(src.len());
    std::str::from_utf8(&src[..end]).unwrap_or("?")
}
