#include <stdio.h>

#include "cc/greet.h"

int main(void) {
    const char *text = "stoker e2e";
    printf("hello from cc_binary: %s %lu\n", text, checksum(text));
    return 0;
}
