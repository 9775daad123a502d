// Type traits: names, block sizes, and which activation type each weight type pairs with.
#include "worker/kernels/quant.h"

#include <strings.h>

// --- table

#define T(id, nm, bl, sz, vd, kern, q) [id] = {nm, bl, sz, vd, kern, q}
static const qtype_traits_t traits[QT_COUNT] = {
    T(QT_F32, "F32", 1, 4, QT_F32, true, true),
    T(QT_F16, "F16", 1, 2, QT_F16, true, true),
    T(QT_BF16, "BF16", 1, 2, QT_BF16, true, true),
    T(QT_Q4_0, "Q4_0", QK4_0, sizeof(block_q4_0), QT_Q8_0, true, true),
    T(QT_Q4_1, "Q4_1", QK4_1, sizeof(block_q4_1), QT_Q8_1, true, true),
    T(QT_Q5_0, "Q5_0", QK5_0, sizeof(block_q5_0), QT_Q8_0, true, true),
    T(QT_Q5_1, "Q5_1", QK5_1, sizeof(block_q5_1), QT_Q8_1, true, true),
    T(QT_Q8_0, "Q8_0", QK8_0, sizeof(block_q8_0), QT_Q8_0, true, true),
    T(QT_Q8_1, "Q8_1", QK8_1, sizeof(block_q8_1), QT_Q8_1, false, true),
    T(QT_Q2_K, "Q2_K", QK_K, sizeof(block_q2_K), QT_Q8_K, true, true),
    T(QT_Q3_K, "Q3_K", QK_K, sizeof(block_q3_K), QT_Q8_K, true, true),
    T(QT_Q4_K, "Q4_K", QK_K, sizeof(block_q4_K), QT_Q8_K, true, true),
    T(QT_Q5_K, "Q5_K", QK_K, sizeof(block_q5_K), QT_Q8_K, true, true),
    T(QT_Q6_K, "Q6_K", QK_K, sizeof(block_q6_K), QT_Q8_K, true, true),
    T(QT_Q8_K, "Q8_K", QK_K, sizeof(block_q8_K), QT_Q8_K, false, true),
    T(QT_I8, "I8", 1, 1, QT_I8, false, false),
    T(QT_I16, "I16", 1, 2, QT_I16, false, false),
    T(QT_I32, "I32", 1, 4, QT_I32, false, false),
    T(QT_I64, "I64", 1, 8, QT_I64, false, false),
    T(QT_F64, "F64", 1, 8, QT_F64, false, false),
};
#undef T

// --- public API

const qtype_traits_t *qtype_traits(int type) {
    if (type < 0 || type >= QT_COUNT || traits[type].name == NULL) return NULL;
    return &traits[type];
}

const char *qtype_name(int type) {
    const qtype_traits_t *t = qtype_traits(type);
    return t ? t->name : "unknown";
}

int qtype_from_name(const char *name) {
    if (!name) return -1;
    for (int i = 0; i < QT_COUNT; i++)
        if (traits[i].name && strcasecmp(traits[i].name, name) == 0) return i;
    return -1;
}

size_t qtype_row_size(qtype_t t, int64_t n) {
    const qtype_traits_t *tr = qtype_traits(t);
    if (!tr || n < 0 || n % tr->blck != 0) return 0;
    return (size_t)(n / tr->blck) * tr->type_size;
}
