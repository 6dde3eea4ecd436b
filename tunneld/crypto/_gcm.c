/* Batch AES-GCM for ESP runs (RFC 4106): one call seals or opens every packet of a run, in place,
 * with the GIL released.
 *
 * Optional: tunneld/crypto/esp.py falls back to the `cryptography` package's AESGCM (the reference
 * this module is tested against byte for byte, tests/unit/test_gcm_batch.py) when it is not built.
 * The cipher context is built once per key (the key schedule) and each packet only sets its nonce
 * (EVP_EncryptInit_ex(ctx, NULL, NULL, NULL, iv)). The caller builds the nonces (salt || IV, RFC 4106
 * §4) and the AADs (RFC 4106 §5) for the whole run as two flat buffers; this code knows nothing of ESP.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <openssl/evp.h>

#define NONCE_LEN 12 /* salt(4) || IV(8), RFC 4106 §4 */
#define TAG_LEN 16   /* the ICV, RFC 4106 §6 */
#define MAX_AAD 16

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
    const EVP_CIPHER *cipher = key.len == 16 ? EVP_aes_128_gcm() : key.len == 32 ? EVP_aes_256_gcm() : NULL;
    if (cipher == NULL) {
        PyBuffer_Release(&key);
        PyErr_SetString(PyExc_ValueError, "AES-GCM keys are 16 or 32 bytes");
        return -1;
    }
    EVP_CIPHER_CTX_free(self->enc);
    EVP_CIPHER_CTX_free(self->dec);
    self->enc = EVP_CIPHER_CTX_new();
    self->dec = EVP_CIPHER_CTX_new();
    int ok = self->enc && self->dec
        && EVP_EncryptInit_ex(self->enc, cipher, NULL, key.buf, NULL) == 1
        && EVP_DecryptInit_ex(self->dec, cipher, NULL, key.buf, NULL) == 1;
    PyBuffer_Release(&key);
    if (!ok) {
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL could not set up AES-GCM");
        return -1;
    }
    return 0;
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
    EVP_CIPHER_CTX *ctx = self->enc;
    const unsigned char *nb = nonces.buf, *ab = aads.buf;
    for (Py_ssize_t i = 0; i < k && ok; i++) {
        unsigned char *dst = (unsigned char *)out.buf + start + i * stride;
        int len = (int)ins[i].len, outl;
        ok = EVP_EncryptInit_ex(ctx, NULL, NULL, NULL, nb + i * NONCE_LEN) == 1
            && (aad_len == 0 || EVP_EncryptUpdate(ctx, NULL, &outl, ab + i * aad_len, (int)aad_len) == 1)
            && (len == 0 || EVP_EncryptUpdate(ctx, dst, &outl, ins[i].buf, len) == 1)
            && EVP_EncryptFinal_ex(ctx, dst + len, &outl) == 1
            && EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, TAG_LEN, dst + len) == 1;
    }
    Py_END_ALLOW_THREADS
    self->busy = 0;
    if (!ok) {
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL AES-GCM encryption failed");
        goto done;
    }
    result = Py_NewRef(Py_None);
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
    EVP_CIPHER_CTX *ctx = self->dec;
    const unsigned char *nb = nonces.buf, *ab = aads.buf;
    unsigned char tag[TAG_LEN];
    for (Py_ssize_t i = 0; i < k; i++) {
        const unsigned char *src = (const unsigned char *)data.buf + start + i * stride;
        unsigned char *dst = (unsigned char *)out.buf + i * ostride;
        int len = (int)((i == k - 1 ? last : length) - TAG_LEN), outl;
        memcpy(tag, src + len, TAG_LEN); /* the ctrl takes a non-const pointer */
        if (!(EVP_DecryptInit_ex(ctx, NULL, NULL, NULL, nb + i * NONCE_LEN) == 1
              && (aad_len == 0 || EVP_DecryptUpdate(ctx, NULL, &outl, ab + i * aad_len, (int)aad_len) == 1)
              && (len == 0 || EVP_DecryptUpdate(ctx, dst, &outl, src, len) == 1)
              && EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, TAG_LEN, tag) == 1)) {
            broken = 1;
            break;
        }
        if (EVP_DecryptFinal_ex(ctx, dst + len, &outl) != 1) {
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

static PyMethodDef gcm_methods[] = {
    {"seal", (PyCFunction)gcm_seal, METH_VARARGS, seal_doc},
    {"open", (PyCFunction)gcm_open, METH_VARARGS, open_doc},
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
