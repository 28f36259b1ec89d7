"""The soak's hostile inferlet, on the raw API bindings; the first argument picks a mode.

Each mode misbehaves in one way and keeps at it until the server ends it (a limit, the
idle timeout) or the soak terminates it at the end of its slot:

    noop                      return at once (the soak's warm-up loads the program)
    idle                      wait for a message that never comes
    hoard CHUNK               allocate KV pages CHUNK at a time until the pool is dry
    bomb PROGRAM DEPTH        launch two children of itself (DEPTH - 1), hold a page, idle
    launch-flood PROGRAM      launch detached idle children until the server refuses one
    spin                      a busy loop (guest CPU)
    grow                      allocate memory 1 MiB at a time
    flood                     send messages to the client as fast as it can
    pull CHANNEL              pull from a channel nobody pushes to
    push CHANNEL TEXT         push one message
    export-hoard PREFIX       export persistent 2-page contexts until the quota refuses
    unexport-all PREFIX       unexport every export whose name starts with PREFIX
    http URL                  POST to URL (the soak points it at a redirect off the list)
"""

import wit_world
from componentize_py_types import Err
from wit_world.imports import http, kv, messaging, model, runtime, types


def wait(fut):
    types.poll([fut.pollable()])
    return fut.get()


def unwrap_ok(value):
    if type(value).__name__ == "Err":
        raise Err(value.value)
    return value.value if type(value).__name__ == "Ok" else value


def idle():
    wait(messaging.receive())


class WitWorld(wit_world.WitWorld):
    def run(self) -> None:
        args = runtime.arguments()
        mode = args[0] if args else "noop"
        q = model.default_model().create_queue()
        if mode == "noop":
            return
        if mode == "idle":
            idle()
        elif mode == "hoard":
            chunk, held = int(args[1]), 0
            while True:
                kv.allocate(q, chunk)
                wait(q.synchronize())
                held += chunk
                if held % (chunk * 16) == 0:
                    messaging.send(f"holding {held}")
        elif mode == "bomb":
            depth = int(args[2])
            if depth > 0:
                for _ in range(2):
                    try:
                        runtime.launch(args[1], ["bomb", args[1], str(depth - 1)])
                    except Err:  # the instance cap refused it: hold what there is
                        break
            kv.allocate(q, 1)
            wait(q.synchronize())
            idle()
        elif mode == "launch-flood":
            n = 0
            try:
                while True:
                    runtime.launch_detached(args[1], ["idle"])
                    n += 1
            except Err:  # the instance cap refused one
                pass
            messaging.send(f"launched {n}")
            idle()
        elif mode == "spin":
            x = 0
            while True:
                x += 1
        elif mode == "grow":
            hog = []
            while True:
                hog.append(bytearray(1 << 20))
        elif mode == "flood":
            while True:
                messaging.send("x" * 100)
        elif mode == "pull":
            messaging.send("pulled " + wait(messaging.pull(args[1])))
        elif mode == "push":
            messaging.push(args[1], args[2])
        elif mode == "export-hoard":
            n = 0
            while True:
                pages = kv.allocate(q, 2)
                kv.export_pages(q, pages, f"{args[1]}-{n}", True)
                wait(q.synchronize())
                n += 1
                messaging.send(f"exported {n}")
        elif mode == "unexport-all":
            names = [name for name, _ in kv.list_exports() if name.startswith(args[1])]
            for name in names:
                kv.unexport_pages(q, name)
            wait(q.synchronize())
            messaging.send(f"unexported {len(names)}")
        elif mode == "http":
            r = unwrap_ok(wait(http.fetch("POST", args[1], [], b"ping")))
            messaging.send(f"{r.status} {bytes(r.body).decode(errors='replace')}")
        else:
            raise Err("unknown mode " + mode)
