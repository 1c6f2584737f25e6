// placeholder: the CPU kernels for reparam_kl are being written
#include "common.h"
