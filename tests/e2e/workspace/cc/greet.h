#ifndef STOKER_E2E_GREET_H
#define STOKER_E2E_GREET_H

unsigned long checksum(const char *text);

#endif
