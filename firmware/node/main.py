# Siteward node: start-up. Picks which copy of the application to run, then runs it.
#
# Builds with OTA partitions carry the application frozen in the firmware image (or in
# the root of the filesystem) and need nothing from here but the start. Builds without
# OTA partitions are updated file by file: the application lives in app_a/ or app_b/,
# "app_active" names the confirmed one, and after an update "app_next" names the new
# one. The new one is tried once ("app_trial" marks the try); if it never confirms
# (confirmation comes from the app once it is back on the broker), the next start goes
# back to the confirmed copy. Mirrors what the ESP-IDF bootloader does with otadata.
import os
import sys


def _read(name):
    try:
        with open(name) as f:
            return f.read().strip()
    except OSError:
        return None


def _exists(name):
    try:
        os.stat(name)
        return True
    except OSError:
        return False


def _remove(name):
    try:
        os.remove(name)
    except OSError:
        pass


def choose_app():
    active = _read("app_active")
    nxt = _read("app_next")
    if nxt:
        if _exists("app_trial"):
            # the new copy had its chance and did not confirm: back to the confirmed one
            _remove("app_next")
            _remove("app_trial")
            with open("app_rolled_back", "w") as f:
                f.write(nxt)
            return active
        with open("app_trial", "w") as f:
            f.write(nxt)
        return nxt
    return active


def main():
    app_dir = choose_app()
    if app_dir:
        sys.path.insert(0, app_dir)
    from siteward import app

    app.run(app_dir)


try:
    main()
except KeyboardInterrupt:
    pass
except Exception as exc:  # an app that cannot start must not hang: restart (and roll back if trial)
    sys.print_exception(exc)
    import machine
    import time

    time.sleep(5)
    machine.reset()
