/* Segmentation and coalescing of IPv6 TCP superpackets in C: the native form of segment_run and
 * coalesce_run (tunneld/fastpath/segment.py, coalesce.py), which stay as the fallback where this is not
 * built and are, with the per-packet `segment` and `coalesce`, what this is tested against byte for byte
 * (tests/unit/test_tcp6_native.py).
 *
 * segment() lays the segments out where the ESP datagrams that carry them will be, so that sealing is in
 * place and a run costs no Python object per packet. coalesce() checks the kernel's GRO rules
 * (tcp_gro_receive) over an opened run and compacts the payloads behind one merged header, so the TUN
 * write is two iovecs. Checksums are summed in native byte order and stored as such (RFC 1071 §2(B)).
 * Both return None for anything they do not handle; the caller then takes the reference path, which
 * parses strictly and counts what is malformed.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define VNET_LEN 10       /* struct virtio_net_hdr, linux include/uapi/linux/virtio_net.h */
#define NEEDS_CSUM 1      /* VIRTIO_NET_HDR_F_NEEDS_CSUM */
#define GSO_TCPV6 4       /* VIRTIO_NET_HDR_GSO_TCPV6 */
#define GSO_ECN 0x80      /* VIRTIO_NET_HDR_GSO_ECN: the first segment carries CWR */
#define IP6_LEN 40        /* RFC 8200 §3 */
#define PROTO_TCP 6
#define FIN 0x01          /* RFC 9293 §3.1 */
#define SYN 0x02
#define RST 0x04
#define PSH 0x08
#define URG 0x20
#define CWR 0x80
#define MAX_SEGMENTS 64   /* as the kernel's GRO */
#define MAX_PAYLOAD 65535 /* the IPv6 payload length field */
#define MAX_SPLIT 1024    /* segments per superpacket we lay out here (an MSS under 64 bytes: the reference) */
#define MAX_STRIDE 65536  /* an opened run's slots are datagram-sized */

static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static uint32_t get32(const uint8_t *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static void put32(uint8_t *p, uint32_t v) { put16(p, (uint16_t)(v >> 16)); put16(p + 2, (uint16_t)v); }

/* RFC 1071 sum of n bytes in native order, reduced to at most 33 bits so that a few of them add without
 * overflow (fold() finishes it; an odd last byte is padded with zero after it). Eight bytes per step with
 * an end-around carry (RFC 1071 §2(C), "parallel summation"), two chains to overlap the carries. */
static uint64_t sum_native(const uint8_t *p, size_t n) {
    uint64_t s = 0, t = 0, w;
    for (; n >= 16; p += 16, n -= 16) {
        memcpy(&w, p, 8);
        s += w;
        s += s < w;
        memcpy(&w, p + 8, 8);
        t += w;
        t += t < w;
    }
    if (n >= 8) {
        memcpy(&w, p, 8);
        t += w;
        t += t < w;
        p += 8;
        n -= 8;
    }
    w = 0;
    memcpy(&w, p, n); /* the last 0..7 bytes, zero-padded */
    t += w;
    t += t < w;
    s += t;
    s += s < t;
    s = (s & 0xFFFFFFFFu) + (s >> 32);
    return (s & 0xFFFFFFFFu) + (s >> 32);
}

static uint16_t fold(uint64_t s) {
    s = (s & 0xFFFFFFFFu) + (s >> 32);
    s = (s & 0xFFFFFFFFu) + (s >> 32);
    s = (s & 0xFFFF) + (s >> 16);
    s = (s & 0xFFFF) + (s >> 16);
    return (uint16_t)((s & 0xFFFF) + (s >> 16));
}

/* A 16-bit value as it reads in native order from its network-order bytes. */
static uint16_t native16(uint16_t v) {
    uint8_t b[2];
    uint16_t r;
    put16(b, v);
    memcpy(&r, b, 2);
    return r;
}

PyDoc_STRVAR(segment_doc,
"segment(vnet, packet, head, tail, next_header) -> (buf, stride, count, last) | None\n\n"
"Split an IPv6 TCP GSO superpacket read from an IFF_VNET_HDR TUN (`vnet`, its 10-byte header) as the\n"
"kernel's tcp_gso_segment would, each segment laid out for sealing in place: segment i at\n"
"buf[i*stride + head:], followed by its ESP trailer (minimal padding, `next_header`, RFC 4303 §2.4) and\n"
"`tail` spare bytes; `head` spare bytes before each. `last` is the last plaintext's length (segment and\n"
"trailer); the others are stride - head - tail. None unless the packet is an IPv6 TCP GSO packet\n"
"without extension headers, with consistent lengths, of at least two full segments.");

static PyObject *tcp6_segment(PyObject *mod, PyObject *args) {
    Py_buffer vb, pb;
    Py_ssize_t head, tail;
    int nh;
    (void)mod;
    if (!PyArg_ParseTuple(args, "y*y*nni", &vb, &pb, &head, &tail, &nh)) return NULL;
    PyObject *result = NULL, *buf = NULL;
    const uint8_t *v = vb.buf, *p = pb.buf;
    Py_ssize_t n = pb.len;
    if (head < 0 || tail < 0 || head > 256 || tail > 256 || nh < 0 || nh > 255) {
        PyErr_SetString(PyExc_ValueError, "segment: head, tail or next header out of range");
        goto done;
    }
    if (vb.len < VNET_LEN || (v[1] & ~GSO_ECN) != GSO_TCPV6 || n < IP6_LEN + 20 || p[0] >> 4 != 6
        || p[6] != PROTO_TCP || get16(p + 4) != n - IP6_LEN) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    Py_ssize_t thl = (p[IP6_LEN + 12] >> 4) * 4, hl = IP6_LEN + thl, size = v[4] | v[5] << 8;
    if (thl < 20 || n < hl || size == 0 || (n - hl) / size < 2 || (n - hl) / size > MAX_SPLIT) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    Py_ssize_t k = (n - hl) / size, rem = n - hl - k * size, count = k + (rem > 0);
    Py_ssize_t full = hl + size, fpad = (-(full + 2)) & 3, stride = head + full + fpad + 2 + tail;
    Py_ssize_t lastlen = rem ? hl + rem : full, lpad = (-(lastlen + 2)) & 3, last = lastlen + lpad + 2;
    buf = PyByteArray_FromStringAndSize(NULL, (count - 1) * stride + head + last + tail);
    if (buf == NULL) goto done;
    uint8_t *out = (uint8_t *)PyByteArray_AS_STRING(buf);
    const uint8_t flags = p[IP6_LEN + 13];
    const uint32_t seq0 = get32(p + IP6_LEN + 4);
    /* The pseudo-header's addresses and next header (RFC 8200 §8.1) are the same for every segment. */
    const uint64_t pseudo = sum_native(p + 8, 32) + native16(PROTO_TCP);
    for (Py_ssize_t i = 0; i < count; i++) {
        uint8_t *d = out + i * stride + head;
        Py_ssize_t pay = i < k ? size : rem, len = hl + pay, pad = i < k ? fpad : lpad;
        uint8_t f = flags;
        if (i) f &= (uint8_t)~CWR;
        if (i != count - 1) f &= (uint8_t)~(FIN | PSH);
        memcpy(d, p, (size_t)hl);
        put16(d + 4, (uint16_t)(thl + pay));
        put32(d + IP6_LEN + 4, seq0 + (uint32_t)(i * size));
        d[IP6_LEN + 13] = f;
        d[IP6_LEN + 16] = d[IP6_LEN + 17] = 0;
        memcpy(d + hl, p + hl + i * size, (size_t)pay);
        uint16_t c = (uint16_t)~fold(pseudo + native16((uint16_t)(thl + pay))
                                     + sum_native(d + IP6_LEN, (size_t)(thl + pay)));
        memcpy(d + IP6_LEN + 16, &c, 2);
        for (Py_ssize_t j = 0; j < pad; j++) d[len + j] = (uint8_t)(j + 1);
        d[len + pad] = (uint8_t)pad;
        d[len + pad + 1] = (uint8_t)nh;
    }
    result = Py_BuildValue("(Onnn)", buf, stride, count, last);
done:
    Py_XDECREF(buf);
    PyBuffer_Release(&vb);
    PyBuffer_Release(&pb);
    return result;
}

PyDoc_STRVAR(complete_doc,
"complete(vnet, packet) -> bytes | None\n\n"
"A packet read from an IFF_VNET_HDR TUN that is not a superpacket (GSO_NONE), as the network must see\n"
"it: with NEEDS_CSUM, the checksum left to us (CHECKSUM_PARTIAL) is completed as skb_checksum_help does,\n"
"the sum from csum_start to the end folded and complemented into csum_start + csum_offset, 0 sent as\n"
"0xFFFF (RFC 768, RFC 8200 §8.1); without it, the packet as it is. None for a superpacket or offsets\n"
"outside the packet (the caller's `segment` then says why).");

static PyObject *tcp6_complete(PyObject *mod, PyObject *args) {
    Py_buffer vb, pb;
    (void)mod;
    if (!PyArg_ParseTuple(args, "y*y*", &vb, &pb)) return NULL;
    PyObject *result = NULL;
    const uint8_t *v = vb.buf;
    if (vb.len < VNET_LEN || v[1] != 0) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    result = PyBytes_FromStringAndSize(pb.buf, pb.len);
    if (result == NULL || !(v[0] & NEEDS_CSUM)) goto done;
    Py_ssize_t start = v[6] | v[7] << 8, at = start + (v[8] | v[9] << 8);
    if (start >= pb.len || at + 2 > pb.len) {
        Py_SETREF(result, Py_NewRef(Py_None));
        goto done;
    }
    uint8_t *d = (uint8_t *)PyBytes_AS_STRING(result);
    uint16_t c = (uint16_t)~fold(sum_native(d + start, (size_t)(pb.len - start)));
    if (c == 0) c = 0xFFFF;
    memcpy(d + at, &c, 2);
done:
    PyBuffer_Release(&vb);
    PyBuffer_Release(&pb);
    return result;
}

PyDoc_STRVAR(coalesce_doc,
"coalesce(arena, stride, count, full, last) -> (vnet, length) | None\n\n"
"Merge an opened run of IPv6 TCP segments (segment i at arena[i*stride:], `full` bytes, `last` for the\n"
"last) into one GSO superpacket for one TUN write, by the rules of coalesce_run (the kernel's GRO). On\n"
"success the arena is rewritten in place: the merged headers (lengths, the last segment's FIN/PSH, the\n"
"partial pseudo-header checksum a GSO write needs) then every payload back to back, `length` bytes in\n"
"all, and the 10-byte virtio-net header to write before them is returned. None, the arena untouched,\n"
"when any rule is broken.");

static PyObject *tcp6_coalesce(PyObject *mod, PyObject *args) {
    Py_buffer ab;
    Py_ssize_t stride, k, full, last;
    (void)mod;
    if (!PyArg_ParseTuple(args, "w*nnnn", &ab, &stride, &k, &full, &last)) return NULL;
    PyObject *result = NULL;
    uint8_t *a = ab.buf;
    if (k < 2 || k > MAX_SEGMENTS || full < IP6_LEN + 20 || full > stride || stride > MAX_STRIDE || last < 0
        || last > full
        || (k - 1) * stride + last > ab.len || a[0] >> 4 != 6 || a[6] != PROTO_TCP)
        goto none;
    Py_ssize_t thl = (a[IP6_LEN + 12] >> 4) * 4, hl = IP6_LEN + thl, size = full - hl, tl = last - hl;
    Py_ssize_t total = size * (k - 1) + tl;
    if (thl < 20 || size <= 0 || tl <= 0 || tl > size || thl + total > MAX_PAYLOAD) goto none;
    const uint8_t f0 = a[IP6_LEN + 13], base = f0 & (uint8_t)~CWR, fk = a[(k - 1) * stride + IP6_LEN + 13];
    if (base & (SYN | RST | URG | FIN | PSH) || (fk & ~(FIN | PSH)) != base) goto none;
    const uint32_t seq0 = get32(a + IP6_LEN + 4);
    for (Py_ssize_t i = 1; i < k; i++) {
        const uint8_t *s = a + i * stride;
        /* Everything but the payload length, sequence number, flags, checksum and urgent pointer
         * is the first segment's. */
        if (memcmp(s, a, 4) || memcmp(s + 6, a + 6, 38) || memcmp(s + 48, a + 48, 5)
            || memcmp(s + 54, a + 54, 2) || memcmp(s + 60, a + 60, (size_t)(hl - 60)))
            goto none;
        if ((i < k - 1 && s[IP6_LEN + 13] != base) || get32(s + IP6_LEN + 4) != seq0 + (uint32_t)(i * size)
            || get16(s + 4) != (i < k - 1 ? full : last) - IP6_LEN)
            goto none;
    }
    if (get16(a + 4) != full - IP6_LEN) goto none;
    for (Py_ssize_t i = 1; i < k; i++)
        memmove(a + hl + i * size, a + i * stride + hl, (size_t)(i < k - 1 ? size : tl));
    a[IP6_LEN + 13] |= fk & (FIN | PSH);
    put16(a + 4, (uint16_t)(thl + total));
    /* The partial checksum: the pseudo-header sum with the merged length, folded, not complemented. */
    uint16_t c = fold(sum_native(a + 8, 32) + native16(PROTO_TCP) + native16((uint16_t)(thl + total)));
    memcpy(a + IP6_LEN + 16, &c, 2);
    uint8_t vnet[VNET_LEN] = {NEEDS_CSUM, (uint8_t)(GSO_TCPV6 | (a[IP6_LEN + 13] & CWR ? GSO_ECN : 0)),
                              (uint8_t)hl, (uint8_t)(hl >> 8), (uint8_t)size, (uint8_t)(size >> 8),
                              IP6_LEN, 0, 16, 0};
    result = Py_BuildValue("(y#n)", vnet, (Py_ssize_t)VNET_LEN, hl + total);
    PyBuffer_Release(&ab);
    return result;
none:
    PyBuffer_Release(&ab);
    return Py_NewRef(Py_None);
}

static PyMethodDef tcp6_methods[] = {
    {"segment", tcp6_segment, METH_VARARGS, segment_doc},
    {"coalesce", tcp6_coalesce, METH_VARARGS, coalesce_doc},
    {"complete", tcp6_complete, METH_VARARGS, complete_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef tcp6_module = {
    PyModuleDef_HEAD_INIT, "tunneld.fastpath._tcp6",
    "IPv6 TCP segmentation and coalescing for the offload fast path, in C.", -1, tcp6_methods,
};

PyMODINIT_FUNC PyInit__tcp6(void) { return PyModule_Create(&tcp6_module); }
