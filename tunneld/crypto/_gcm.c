/* Batch AES-GCM for ESP runs (RFC 4106): one call seals or opens every packet of a run, in place,
 * with the GIL released.
 *
 * Optional: tunneld/crypto/esp.py falls back to the `cryptography` package's AESGCM (the reference
 * this module is tested against byte for byte, tests/unit/test_gcm_batch.py) when it is not built.
 * The cipher context is built once per key (the key schedule) and each packet only sets its nonce;
 * the tag goes through prebuilt OSSL_PARAMs rather than the ctrl shim (about 0.1 µs a packet less).
 * `seal`/`open` are the bare primitive (any nonces and AADs, for the known-answer tests); `seal_esp`/
 * `open_esp` build the ESP header, nonce (salt || IV, RFC 4106 §4) and AAD (RFC 4106 §5) themselves,
 * so a run costs one call and no Python object per packet.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include <stdint.h>

#define NONCE_LEN 12 /* salt(4) || IV(8), RFC 4106 §4 */
#define TAG_LEN 16   /* the ICV, RFC 4106 §6 */
#define MAX_AAD 16
#define ESP_HEAD 16  /* SPI(4) | seq low 32 bits(4) | IV(8): RFC 4303 §2, RFC 4106 §3.1 */
#define ESP_MIN 36   /* header, the smallest aligned trailer (4), ICV */

typedef struct {
    PyObject_HEAD
    EVP_CIPHER_CTX *enc;
    EVP_CIPHER_CTX *dec;
    int busy; /* set under the GIL around a GIL-free run: the contexts are not shared between threads */
} GCM;

static void gcm_dealloc(GCM *self) {
    EVP_CIPHER_CTX_free(self->enc);
    EVP_CIPHER_CTX_free(self->dec);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int gcm_init(GCM *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"key", NULL};
    Py_buffer key;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*", kwlist, &key)) return -1;
    const char *name = key.len == 16 ? "AES-128-GCM" : key.len == 32 ? "AES-256-GCM" : NULL;
    if (name == NULL) {
        PyBuffer_Release(&key);
        PyErr_SetString(PyExc_ValueError, "AES-GCM keys are 16 or 32 bytes");
        return -1;
    }
    EVP_CIPHER_CTX_free(self->enc);
    EVP_CIPHER_CTX_free(self->dec);
    /* An explicit fetch: the implicit one behind EVP_aes_*_gcm() is looked up again on every init. */
    EVP_CIPHER *cipher = EVP_CIPHER_fetch(NULL, name, NULL);
    self->enc = EVP_CIPHER_CTX_new();
    self->dec = EVP_CIPHER_CTX_new();
    int ok = cipher && self->enc && self->dec
        && EVP_EncryptInit_ex2(self->enc, cipher, key.buf, NULL, NULL) == 1
        && EVP_DecryptInit_ex2(self->dec, cipher, key.buf, NULL, NULL) == 1;
    EVP_CIPHER_free(cipher); /* the contexts hold their own references */
    PyBuffer_Release(&key);
    if (!ok) {
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL could not set up AES-GCM");
        return -1;
    }
    return 0;
}

/* One packet: ciphertext || tag of `len` bytes of `in` at `dst` (in == dst is allowed). 1 on success. */
static int seal_one(EVP_CIPHER_CTX *ctx, const unsigned char *nonce, const unsigned char *aad, int aad_len,
                    const unsigned char *in, int len, unsigned char *dst) {
    int outl;
    OSSL_PARAM tag[2] = {OSSL_PARAM_construct_octet_string(OSSL_CIPHER_PARAM_AEAD_TAG, dst + len, TAG_LEN),
                         OSSL_PARAM_construct_end()};
    return EVP_EncryptInit_ex2(ctx, NULL, NULL, nonce, NULL) == 1
        && (aad_len == 0 || EVP_EncryptUpdate(ctx, NULL, &outl, aad, aad_len) == 1)
        && (len == 0 || EVP_EncryptUpdate(ctx, dst, &outl, in, len) == 1)
        && EVP_EncryptFinal_ex(ctx, dst + len, &outl) == 1
        && EVP_CIPHER_CTX_get_params(ctx, tag) == 1;
}

/* One packet: `len` bytes of ciphertext at `src`, then its tag, into `dst`. 1: opened; 0: the tag did not
 * verify; -1: OpenSSL failed otherwise. */
static int open_one(EVP_CIPHER_CTX *ctx, const unsigned char *nonce, const unsigned char *aad, int aad_len,
                    const unsigned char *src, int len, unsigned char *dst) {
    int outl;
    unsigned char tag[TAG_LEN];
    memcpy(tag, src + len, TAG_LEN); /* the parameter takes a non-const pointer; src may be read-only */
    OSSL_PARAM set[2] = {OSSL_PARAM_construct_octet_string(OSSL_CIPHER_PARAM_AEAD_TAG, tag, TAG_LEN),
                         OSSL_PARAM_construct_end()};
    if (!(EVP_DecryptInit_ex2(ctx, NULL, NULL, nonce, NULL) == 1
          && (aad_len == 0 || EVP_DecryptUpdate(ctx, NULL, &outl, aad, aad_len) == 1)
          && (len == 0 || EVP_DecryptUpdate(ctx, dst, &outl, src, len) == 1)
          && EVP_CIPHER_CTX_set_params(ctx, set) == 1))
        return -1;
    return EVP_DecryptFinal_ex(ctx, dst + len, &outl) == 1;
}

/* Checks the nonces and AADs describe `count` packets; returns count or -1 with an exception set. */
static Py_ssize_t run_count(Py_buffer *nonces, Py_buffer *aads, Py_ssize_t aad_len) {
    if (nonces->len % NONCE_LEN || nonces->len == 0) {
        PyErr_SetString(PyExc_ValueError, "nonces: a positive multiple of 12 bytes");
        return -1;
    }
    Py_ssize_t k = nonces->len / NONCE_LEN;
    if (aad_len < 0 || aad_len > MAX_AAD || aads->len != k * aad_len) {
        PyErr_SetString(PyExc_ValueError, "aads: one aad_len-byte AAD (at most 16) per nonce");
        return -1;
    }
    return k;
}

static int take(GCM *self) {
    if (self->enc == NULL || self->dec == NULL) {
        PyErr_SetString(PyExc_ValueError, "GCM object without a key");
        return 0;
    }
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "GCM object used by two threads at once");
        return 0;
    }
    self->busy = 1;
    return 1;
}

/* After a GIL-free seal: the contexts are free again; None, or NULL with the exception if OpenSSL failed. */
static PyObject *sealed(GCM *self, int ok) {
    self->busy = 0;
    if (!ok) {
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL AES-GCM encryption failed");
        return NULL;
    }
    return Py_NewRef(Py_None);
}

PyDoc_STRVAR(seal_doc,
"seal(nonces, aads, aad_len, plaintexts, out, start, stride)\n\n"
"Encrypt plaintexts[i] with nonces[12i:12i+12] and aads[i*aad_len:(i+1)*aad_len]; write its\n"
"ciphertext || 16-byte tag at out[start + i*stride:]. Every datagram but the last must fit its stride.");

static PyObject *gcm_seal(GCM *self, PyObject *args) {
    Py_buffer nonces, aads, out;
    Py_ssize_t aad_len, start, stride;
    PyObject *seq;
    if (!PyArg_ParseTuple(args, "y*y*nOw*nn", &nonces, &aads, &aad_len, &seq, &out, &start, &stride))
        return NULL;
    PyObject *fast = NULL, *result = NULL;
    Py_buffer *ins = NULL;
    Py_ssize_t got = 0, k = run_count(&nonces, &aads, aad_len);
    if (k < 0) goto done;
    fast = PySequence_Fast(seq, "plaintexts: a sequence of buffers");
    if (fast == NULL) goto done;
    if (PySequence_Fast_GET_SIZE(fast) != k) {
        PyErr_SetString(PyExc_ValueError, "one plaintext per nonce");
        goto done;
    }
    ins = PyMem_Calloc((size_t)k, sizeof(Py_buffer));
    if (ins == NULL) { PyErr_NoMemory(); goto done; }
    PyObject **items = PySequence_Fast_ITEMS(fast);
    for (; got < k; got++) {
        if (PyObject_GetBuffer(items[got], &ins[got], PyBUF_SIMPLE) < 0) goto done;
        Py_ssize_t n = ins[got].len + TAG_LEN;
        if (n > INT_MAX || (got < k - 1 && n > stride)) {
            PyErr_SetString(PyExc_ValueError, "a sealed packet does not fit its stride");
            goto done;
        }
    }
    if (start < 0 || stride < 0 || start + (k - 1) * stride + ins[k - 1].len + TAG_LEN > out.len) {
        PyErr_SetString(PyExc_ValueError, "out is too small for the run");
        goto done;
    }
    if (!take(self)) goto done;
    int ok = 1;
    Py_BEGIN_ALLOW_THREADS
    const unsigned char *nb = nonces.buf, *ab = aads.buf;
    for (Py_ssize_t i = 0; i < k && ok; i++)
        ok = seal_one(self->enc, nb + i * NONCE_LEN, ab + i * aad_len, (int)aad_len, ins[i].buf,
                      (int)ins[i].len, (unsigned char *)out.buf + start + i * stride);
    Py_END_ALLOW_THREADS
    result = sealed(self, ok);
done:
    for (Py_ssize_t i = 0; i < got; i++) PyBuffer_Release(&ins[i]);
    PyMem_Free(ins);
    Py_XDECREF(fast);
    PyBuffer_Release(&nonces);
    PyBuffer_Release(&aads);
    PyBuffer_Release(&out);
    return result;
}

PyDoc_STRVAR(open_doc,
"open(nonces, aads, aad_len, data, start, stride, length, last_length, out, out_stride) -> int\n\n"
"Decrypt the ciphertext || tag of packet i, data[start + i*stride:] of `length` bytes (`last_length`\n"
"for the last), into out[i*out_stride:]. Returns -1 when every tag verified, else the index of the\n"
"first packet that failed (the packets after it are not opened; out holds garbage from it on).");

static PyObject *gcm_open(GCM *self, PyObject *args) {
    Py_buffer nonces, aads, data, out;
    Py_ssize_t aad_len, start, stride, length, last, ostride;
    if (!PyArg_ParseTuple(args, "y*y*ny*nnnnw*n", &nonces, &aads, &aad_len, &data, &start, &stride,
                          &length, &last, &out, &ostride))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t k = run_count(&nonces, &aads, aad_len);
    if (k < 0) goto done;
    if (length < TAG_LEN || last < TAG_LEN || length > INT_MAX || last > INT_MAX || start < 0
        || stride < length || ostride < length - TAG_LEN
        || start + (k - 1) * stride + last > data.len
        || (k - 1) * ostride + last - TAG_LEN > out.len
        || (k > 1 && start + (k - 2) * stride + length > data.len)) {
        PyErr_SetString(PyExc_ValueError, "the layout does not fit data or out");
        goto done;
    }
    if (!take(self)) goto done;
    Py_ssize_t failed = -1;
    int broken = 0;
    Py_BEGIN_ALLOW_THREADS
    const unsigned char *nb = nonces.buf, *ab = aads.buf;
    for (Py_ssize_t i = 0; i < k; i++) {
        int r = open_one(self->dec, nb + i * NONCE_LEN, ab + i * aad_len, (int)aad_len,
                         (const unsigned char *)data.buf + start + i * stride,
                         (int)((i == k - 1 ? last : length) - TAG_LEN), (unsigned char *)out.buf + i * ostride);
        if (r != 1) {
            broken = r < 0;
            failed = i;
            break;
        }
    }
    Py_END_ALLOW_THREADS
    self->busy = 0;
    if (broken) {
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL AES-GCM decryption failed");
        goto done;
    }
    result = PyLong_FromSsize_t(failed);
done:
    PyBuffer_Release(&nonces);
    PyBuffer_Release(&aads);
    PyBuffer_Release(&data);
    PyBuffer_Release(&out);
    return result;
}

/* -- ESP runs ------------------------------------------------------------------------------------- */

static void put32(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)(v >> 24); p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8); p[3] = (unsigned char)v;
}

static uint32_t get32(const unsigned char *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* The AAD of sequence number `seq` (RFC 4106 §5): SPI || seq-hi || seq-lo with ESN, SPI || seq-lo
 * without. Returns its length. */
static int esp_aad(unsigned char *aad, uint32_t spi, uint64_t seq, int esn) {
    put32(aad, spi);
    if (esn) {
        put32(aad + 4, (uint32_t)(seq >> 32));
        put32(aad + 8, (uint32_t)seq);
        return 12;
    }
    put32(aad + 4, (uint32_t)seq);
    return 8;
}

PyDoc_STRVAR(seal_esp_doc,
"seal_esp(buf, stride, count, last, salt, spi, seq, esn)\n\n"
"Seal `count` ESP datagrams in place. Datagram i starts at buf[i*stride]; its plaintext (inner packet\n"
"and ESP trailer) lies after the 16 header bytes and is stride - 32 bytes long (`last` for the last\n"
"datagram), and 16 bytes are left after it for the ICV. Writes each header (SPI, low 32 bits of the\n"
"sequence number, IV = the 64-bit sequence number: RFC 4303 §2, RFC 4106 §3.1) and replaces the\n"
"plaintext with ciphertext || ICV. Datagram i carries sequence number seq + i; buf must be exactly\n"
"(count - 1) * stride + 32 + last bytes.");

static PyObject *gcm_seal_esp(GCM *self, PyObject *args) {
    Py_buffer buf, salt;
    Py_ssize_t stride, count, last;
    unsigned long spi;
    unsigned long long seq;
    int esn;
    if (!PyArg_ParseTuple(args, "w*nnny*kKp", &buf, &stride, &count, &last, &salt, &spi, &seq, &esn))
        return NULL;
    PyObject *result = NULL;
    if (salt.len != 4 || spi > 0xFFFFFFFFUL || count < 1 || stride < ESP_HEAD + TAG_LEN
        || stride - ESP_HEAD - TAG_LEN > INT_MAX || last < 0 || last > stride - ESP_HEAD - TAG_LEN
        || buf.len != (count - 1) * stride + ESP_HEAD + last + TAG_LEN
        || seq + (unsigned long long)(count - 1) < seq) {
        PyErr_SetString(PyExc_ValueError, "seal_esp: the layout does not describe buf");
        goto done;
    }
    if (!take(self)) goto done;
    int ok = 1;
    Py_BEGIN_ALLOW_THREADS
    unsigned char nonce[NONCE_LEN], aad[12];
    memcpy(nonce, salt.buf, 4);
    int full = (int)(stride - ESP_HEAD - TAG_LEN);
    for (Py_ssize_t i = 0; i < count && ok; i++) {
        unsigned char *d = (unsigned char *)buf.buf + i * stride;
        uint64_t s = seq + (uint64_t)i;
        put32(d, (uint32_t)spi);
        put32(d + 4, (uint32_t)s);
        put32(d + 8, (uint32_t)(s >> 32));
        put32(d + 12, (uint32_t)s);
        memcpy(nonce + 4, d + 8, 8);
        int aad_len = esp_aad(aad, (uint32_t)spi, s, esn);
        ok = seal_one(self->enc, nonce, aad, aad_len, d + ESP_HEAD, i == count - 1 ? (int)last : full,
                      d + ESP_HEAD);
    }
    Py_END_ALLOW_THREADS
    result = sealed(self, ok);
done:
    PyBuffer_Release(&buf);
    PyBuffer_Release(&salt);
    return result;
}

/* Whether the plaintext `p` of `n` bytes ends in a minimal ESP trailer with `nh` (pad length 0..3, pad
 * bytes 1, 2, 3, RFC 4303 §2.4): its pad length, or -1. */
static int minimal_pad(const unsigned char *p, Py_ssize_t n, int nh) {
    if (n < 2 || p[n - 1] != nh || p[n - 2] > 3 || n < 2 + p[n - 2]) return -1;
    int pad = p[n - 2];
    for (int j = 0; j < pad; j++)
        if (p[n - 2 - pad + j] != j + 1) return -1;
    return pad;
}

PyDoc_STRVAR(open_esp_doc,
"open_esp(data, size, salt, spi, seq, esn, next_header) -> (arena, full, last) | None\n\n"
"Open a UDP GRO receive: ESP datagrams of `size` bytes back to back in data (the last may be shorter)\n"
"that carry `spi` and the consecutive sequence numbers seq, seq + 1, ... (checked on their low 32 bits;\n"
"the caller inferred seq and checked it against its replay window). Inner packet i is arena[i*(size-32):]\n"
"of `full` bytes (`last` for the last). None, with nothing returned, unless every datagram has the\n"
"expected SPI and sequence number, every ICV verifies, and every trailer is minimal padding with\n"
"`next_header`, one length for all but the last: the caller then opens one by one, counting each fault.");

static PyObject *gcm_open_esp(GCM *self, PyObject *args) {
    Py_buffer data, salt;
    Py_ssize_t size;
    unsigned long spi;
    unsigned long long seq;
    int esn, nh;
    if (!PyArg_ParseTuple(args, "y*ny*kKpi", &data, &size, &salt, &spi, &seq, &esn, &nh)) return NULL;
    PyObject *result = NULL, *arena = NULL;
    Py_ssize_t n = data.len;
    if (salt.len != 4 || spi > 0xFFFFFFFFUL || nh < 0 || nh > 255) {
        PyErr_SetString(PyExc_ValueError, "open_esp: bad salt, SPI or next header");
        goto done;
    }
    if (size < ESP_MIN || size > INT_MAX || (size - ESP_HEAD - TAG_LEN) & 3 || n <= size) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    Py_ssize_t k = (n + size - 1) / size, tail = n - (k - 1) * size, stride = size - ESP_HEAD - TAG_LEN;
    if (tail < ESP_MIN || (tail - ESP_HEAD - TAG_LEN) & 3 || seq + (unsigned long long)(k - 1) < seq) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    const unsigned char *src = data.buf;
    for (Py_ssize_t i = 0; i < k; i++)
        if (get32(src + i * size) != spi || get32(src + i * size + 4) != (uint32_t)(seq + (uint64_t)i)) {
            result = Py_NewRef(Py_None);
            goto done;
        }
    arena = PyByteArray_FromStringAndSize(NULL, k * stride); /* every byte is written before it is read */
    if (arena == NULL) goto done;
    if (!take(self)) goto done;
    int r = 1, pad = -1, last_pad = -1;
    Py_BEGIN_ALLOW_THREADS
    unsigned char nonce[NONCE_LEN], aad[12], *out = (unsigned char *)PyByteArray_AS_STRING(arena);
    memcpy(nonce, salt.buf, 4);
    for (Py_ssize_t i = 0; i < k && r == 1; i++) {
        const unsigned char *d = src + i * size;
        Py_ssize_t pt = (i == k - 1 ? tail : size) - ESP_HEAD - TAG_LEN;
        memcpy(nonce + 4, d + 8, 8); /* the IV as sent: RFC 4106 §3.1 lets the sender choose it */
        int aad_len = esp_aad(aad, (uint32_t)spi, seq + (uint64_t)i, esn);
        r = open_one(self->dec, nonce, aad, aad_len, d + ESP_HEAD, (int)pt, out + i * stride);
        if (r == 1) {
            int p = minimal_pad(out + i * stride, pt, nh);
            if (i == k - 1) last_pad = p;
            else if (i == 0) pad = p;
            if (p < 0 || (i > 0 && i < k - 1 && p != pad)) r = 0;
        }
    }
    Py_END_ALLOW_THREADS
    self->busy = 0;
    if (r < 0) {
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL AES-GCM decryption failed");
        goto done;
    }
    if (r == 0 || last_pad < 0 || pad < 0) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    result = Py_BuildValue("(Onn)", arena, stride - 2 - pad, tail - ESP_HEAD - TAG_LEN - 2 - last_pad);
done:
    Py_XDECREF(arena);
    PyBuffer_Release(&data);
    PyBuffer_Release(&salt);
    return result;
}

static PyMethodDef gcm_methods[] = {
    {"seal", (PyCFunction)gcm_seal, METH_VARARGS, seal_doc},
    {"open", (PyCFunction)gcm_open, METH_VARARGS, open_doc},
    {"seal_esp", (PyCFunction)gcm_seal_esp, METH_VARARGS, seal_esp_doc},
    {"open_esp", (PyCFunction)gcm_open_esp, METH_VARARGS, open_esp_doc},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject GCMType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "tunneld.crypto._gcm.GCM",
    .tp_doc = PyDoc_STR("GCM(key): AES-128/256-GCM contexts for one key, for sealing and opening runs."),
    .tp_basicsize = sizeof(GCM),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)gcm_init,
    .tp_dealloc = (destructor)gcm_dealloc,
    .tp_methods = gcm_methods,
};

static struct PyModuleDef gcm_module = {
    PyModuleDef_HEAD_INIT, "tunneld.crypto._gcm",
    "Batch AES-GCM over OpenSSL's libcrypto, the GIL released for a whole run.", -1, NULL,
};

PyMODINIT_FUNC PyInit__gcm(void) {
    if (PyType_Ready(&GCMType) < 0) return NULL;
    PyObject *m = PyModule_Create(&gcm_module);
    if (m == NULL) return NULL;
    if (PyModule_AddObjectRef(m, "GCM", (PyObject *)&GCMType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
