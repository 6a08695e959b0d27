#include "cc/greet.h"

unsigned long checksum(const char *text) {
    unsigned long sum = 5381;
    while (*text) {
        sum = sum * 33 + (unsigned char)*text++;
    }
    return sum;
}
