"""Moving files out of a collection without ever losing or overwriting one: a hard link then the
source removed, or a copy renamed into place; each move's outcome named after it happened, and a
move a kill interrupted finished by the next run (find_duplicates.py --move_to).

    status, reason = move_one("photos/a.jpg", "duplicates/a.jpg")   # moved | refused | failed
"""

import errno
import filecmp
import os
import shutil


def move_file(src, dst):
    """Move src to dst, never overwriting (FileExistsError) and never losing it: a hard link, then
    the source removed; where links do not work (another filesystem), a copy under a temporary name
    renamed into place, then the source removed. A kill at any point leaves src, or src and a whole
    dst, which a rerun finishes (moves)."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    try:
        os.link(src, dst)
    except FileExistsError:
        raise
    except OSError:
        partial = f"{dst}.partial"
        shutil.copy2(src, partial)
        if os.path.exists(dst):
            os.unlink(partial)
            raise FileExistsError(errno.EEXIST, "File exists", dst) from None
        os.replace(partial, dst)
    os.unlink(src)


def move_one(src, dst):
    """(status, reason) of one planned move, after trying it: moved (the file is at dst and gone from
    src; also when an earlier run moved it, or left both copies when it was killed), refused (dst
    holds another file), or failed (src is gone, or the move raised)."""
    if os.path.lexists(src) and os.path.exists(dst):
        try:
            if not (os.path.samefile(src, dst) or filecmp.cmp(src, dst, shallow=False)):
                return "refused", f"{dst} exists already and holds another file"
            os.unlink(src)  # an interrupted earlier move left both: the copy at dst is whole
        except OSError as err:
            return "failed", err.strerror or str(err)
    elif not os.path.lexists(src) and not os.path.exists(dst):
        return "failed", "the file is gone and not in --move_to; re-embed the folder with gen_embeddings.py"
    elif os.path.lexists(src):
        try:
            move_file(src, dst)
        except FileExistsError:
            return "refused", f"{dst} exists already"
        except OSError as err:
            return "failed", err.strerror or str(err)
    if not os.path.lexists(src) and os.path.exists(dst):
        return "moved", ""
    return "failed", "not at the destination after the move"
