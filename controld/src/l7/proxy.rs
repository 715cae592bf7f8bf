//! The PROXY protocol version 2 header (HAProxy's PROXY protocol
//! specification, section 2.2) that tells a backend the client's address:
//! sent before the request head when a service sets `proxy_protocol`.
//! Only what layer 7 needs: command PROXY, TCP over IPv4.

use std::net::Ipv4Addr;

/// The 12-byte signature that starts every v2 header.
pub const SIGNATURE: [u8; 12] = [
    0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a,
];
/// Version 2 (high nibble), command PROXY (low nibble 1).
pub const VERSION_PROXY: u8 = 0x21;
/// Address family AF_INET (high nibble 1), protocol STREAM (low nibble 1).
pub const TCP_OVER_IPV4: u8 = 0x11;
/// Length of the IPv4 address block: two addresses and two ports.
pub const IPV4_BLOCK_LEN: u16 = 12;
/// Length of a whole header for TCP over IPv4.
pub const HEADER_LEN: usize = 16 + IPV4_BLOCK_LEN as usize;

/// The header for a connection from `client` to `server` (the VIP the
/// client connected to), all in network byte order.
pub fn header_v2(
    client: Ipv4Addr,
    client_port: u16,
    server: Ipv4Addr,
    server_port: u16,
) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..12].copy_from_slice(&SIGNATURE);
    h[12] = VERSION_PROXY;
    h[13] = TCP_OVER_IPV4;
    h[14..16].copy_from_slice(&IPV4_BLOCK_LEN.to_be_bytes());
    h[16..20].copy_from_slice(&client.octets());
    h[20..24].copy_from_slice(&server.octets());
    h[24..26].copy_from_slice(&client_port.to_be_bytes());
    h[26..28].copy_from_slice(&server_port.to_be_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_the_specs_bytes() {
        // Spec 2.2: "\r\n\r\n\0\r\nQUIT\n", 0x21, 0x11, length 12, then
        // src addr, dst addr, src port, dst port, big-endian.
        let h = header_v2(
            Ipv4Addr::new(198, 18, 100, 7),
            40000,
            Ipv4Addr::new(198, 18, 0, 10),
            443,
        );
        let want: [u8; 28] = [
            b'\r', b'\n', b'\r', b'\n', 0, b'\r', b'\n', b'Q', b'U', b'I', b'T', b'\n', //
            0x21, 0x11, 0x00, 0x0c, //
            198, 18, 100, 7, //
            198, 18, 0, 10, //
            0x9c, 0x40, //
            0x01, 0xbb,
        ];
        assert_eq!(h, want);
    }
}
