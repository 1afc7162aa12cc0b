#!/usr/bin/env python3
"""Compares the machine code of each kernel in two CUBINs (ELF files from NVRTC): a refactor of a
kernel file checked without a GPU, where the code ptxas makes is the same byte for byte.

  MOE_DISPATCH_CUBIN_OUT=/tmp/before bash scripts/check-kernels.sh sm_90a   (then the change)
  MOE_DISPATCH_CUBIN_OUT=/tmp/after bash scripts/check-kernels.sh sm_90a
  python3 scripts/cubin-diff.py /tmp/before/grouped_gemm.cu.sm_90a.cubin /tmp/after/grouped_gemm.cu.sm_90a.cubin

Prints each kernel's .text section size before and after and whether the bytes are identical;
exit code 1 if any kernel differs, is missing on one side, or a file is not a 64-bit ELF."""
import struct
import sys


def text_sections(path):
    """The .text.<kernel> sections of an ELF64 little-endian file: name -> bytes."""
    data = open(path, 'rb').read()
    if data[:4] != b'\x7fELF' or data[4] != 2 or data[5] != 1:
        sys.exit(f'{path}: not a 64-bit little-endian ELF file')
    shoff = struct.unpack_from('<Q', data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from('<HHH', data, 0x3A)
    headers = [struct.unpack_from('<IIQQQQIIQQ', data, shoff + i * shentsize) for i in range(shnum)]
    names_at = headers[shstrndx][4]
    out = {}
    for name_off, kind, _flags, _addr, offset, size, *_ in headers:
        name = data[names_at + name_off : data.index(b'\0', names_at + name_off)].decode()
        if name.startswith('.text.') and kind != 8:  # (8: SHT_NOBITS)
            out[name[len('.text.') :]] = data[offset : offset + size]
    return out


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    before, after = text_sections(sys.argv[1]), text_sections(sys.argv[2])
    differ = 0
    for name in sorted(set(before) | set(after)):
        a, b = before.get(name), after.get(name)
        same = a == b
        differ += not same
        size = lambda s: '-' if s is None else str(len(s))
        print(f"{name:50s} {size(a):>8} {size(b):>8} {'identical' if same else 'DIFFERENT'}")
    print(f'{len(set(before) | set(after)) - differ} identical, {differ} different')
    sys.exit(1 if differ else 0)


main()
