#!/usr/bin/env python3
"""Rewrites a .cu file for the CUDA emulator (t/cuda_emu/emu.h): each
kernel launch

    kernel<T><<<grid, block, smem, stream>>>(args);

becomes

    emu_launch(grid, block, smem, stream, [&]() { kernel<T>(args); });

Usage: transform.py IN.cu OUT.cpp
"""

import sys


def matching(s, i, open_ch, close_ch):
    """Index just past the bracket that closes the one at s[i]."""
    depth = 0
    while i < len(s):
        if s[i] == open_ch:
            depth += 1
        elif s[i] == close_ch:
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise ValueError("unbalanced %s" % open_ch)


def split_top(s):
    """Splits launch arguments at top-level commas."""
    parts, depth, cur = [], 0, ""
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    parts.append(cur.strip())
    return parts


def transform(src):
    out, pos = "", 0
    while True:
        i = src.find("<<<", pos)
        if i < 0:
            return out + src[pos:]
        # the callee: back to the end of the previous statement or label
        j = i
        while j > pos and src[j - 1] not in ";{}:" and \
                not src[j - 2:j] == "*/":
            j -= 1
        callee = src[j:i].strip()
        k = src.find(">>>", i)
        conf = split_top(src[i + 3:k])
        while len(conf) < 4:
            conf.append("0")
        a0 = src.index("(", k)
        a1 = matching(src, a0, "(", ")")
        args = src[a0:a1]
        head = src[pos:j]
        # keep the callee's leading whitespace
        lead = src[j:i][:len(src[j:i]) - len(src[j:i].lstrip())]
        out += head + lead + "emu_launch(%s, %s, %s, %s, [&]() { %s%s; })" % (
            conf[0], conf[1], conf[2], conf[3], callee, args)
        pos = a1


def main():
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    with open(sys.argv[1]) as f:
        src = f.read()
    with open(sys.argv[2], "w") as f:
        f.write('#line 1 "%s"\n' % sys.argv[1])
        f.write(transform(src))
    return 0


if __name__ == "__main__":
    sys.exit(main())
