#!/usr/bin/env python3
"""Writes seed bursts for the filter fuzz target (fuzz_targets/filter.rs):
valid frames for the fixture's services, so the fuzzer starts from the
paths real traffic takes. Run from fuzz/: python3 seeds/make_filter_seeds.py"""
import struct

def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16: s = (s & 0xffff) + (s >> 16)
    return (~s) & 0xffff

def ip4(a): return bytes(int(x) for x in a.split("."))

def ipv4(src, dst, proto, payload, ident=1, flags=0x4000):
    h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, flags, 64, proto, 0, ip4(src), ip4(dst))
    h = h[:10] + struct.pack("!H", csum(h)) + h[12:]
    return h + payload

def l4sum(src, dst, proto, seg):
    return csum(ip4(src) + ip4(dst) + struct.pack("!BBH", 0, proto, len(seg)) + seg)

def tcp(src, dst, sp, dp, flags, seq=1, ack=0, data=b""):
    t = struct.pack("!HHIIBBHHH", sp, dp, seq, ack, 5 << 4, flags, 65535, 0, 0) + data
    c = l4sum(src, dst, 6, t)
    return t[:16] + struct.pack("!H", c) + t[18:]

def udp(src, dst, sp, dp, data):
    u = struct.pack("!HHHH", sp, dp, 8 + len(data), 0) + data
    c = l4sum(src, dst, 17, u) or 0xffff
    return u[:6] + struct.pack("!H", c) + u[8:]

PORT0 = bytes([2, 0, 0, 0, 0, 1]); PORT1 = bytes([2, 0, 0, 0, 0, 2])
GW = bytes([2, 0, 0, 0, 2, 1]); B1 = bytes([2, 0, 0, 0, 1, 1])
VIP, CL, BE = "198.18.0.10", "198.18.100.1", "198.19.1.1"

def eth(dst, src, payload, et=0x0800): return dst + src + struct.pack("!H", et) + payload

def rec(port, frame, adv=0): return bytes([port, adv]) + struct.pack("!H", len(frame)) + frame

S, A, F, R, P = 2, 16, 1, 4, 8
seeds = {
    "tcp_handshake": [rec(0, eth(PORT0, GW, ipv4(CL, VIP, 6, tcp(CL, VIP, 40000, 80, S)))),
                      rec(1, eth(PORT1, B1, ipv4(BE, CL, 6, tcp(BE, CL, 8080, 40000, S | A, 9, 2)))),
                      rec(0, eth(PORT0, GW, ipv4(CL, VIP, 6, tcp(CL, VIP, 40000, 80, A, 2, 10)))),
                      rec(0, eth(PORT0, GW, ipv4(CL, VIP, 6, tcp(CL, VIP, 40000, 80, A | P, 2, 10, b"GET / HTTP/1.1\r\n\r\n")))),
                      rec(0, eth(PORT0, GW, ipv4(CL, VIP, 6, tcp(CL, VIP, 40000, 80, F | A, 20, 10))), 50)],
    "mid_flow_ack": [rec(0, eth(PORT0, GW, ipv4(CL, VIP, 6, tcp(CL, VIP, 40001, 80, A, 5, 5))))] * 3,
    "udp": [rec(0, eth(PORT0, GW, ipv4(CL, VIP, 17, udp(CL, VIP, 5000, 53, b"query")))),
            rec(1, eth(PORT1, B1, ipv4(BE, CL, 17, udp(BE, CL, 5353, 5000, b"answer"))))],
    "tunnel": [rec(0, eth(PORT0, GW, ipv4(CL, VIP, 6, tcp(CL, VIP, 40002, 443, S)))),
               rec(0, eth(PORT0, GW, ipv4(CL, VIP, 6, tcp(CL, VIP, 40002, 443, A, 2, 1, b"x" * 1400))))],
    "rst": [rec(0, eth(PORT0, GW, ipv4(CL, VIP, 6, tcp(CL, VIP, 40003, 81, S))))],
    "arp": [rec(0, eth(b"\xff" * 6, GW, struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, GW, ip4("198.18.0.1"), b"\0" * 6, ip4(VIP)), 0x0806))],
    "fragment": [rec(0, eth(PORT0, GW, ipv4(CL, VIP, 17, udp(CL, VIP, 5001, 53, b"y" * 64)[:48], 7, 0x2000))),
                 rec(0, eth(PORT0, GW, ipv4(CL, VIP, 17, b"z" * 32, 7, 6)))],
    "icmp": [rec(0, eth(PORT0, GW, ipv4(CL, VIP, 1, bytes([8, 0, 0xf7, 0xff, 0, 0, 0, 0]))))],
}
for name, recs in seeds.items():
    open(f"seeds/filter/{name}", "wb").write(b"".join(recs))
