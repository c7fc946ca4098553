"""Second process for test_shared.py: receives the memfd over a Unix socket, obeys commands."""
import socket
import sys

import discache


def main() -> None:
    channel = socket.socket(fileno=int(sys.argv[1]))
    _, fds, _, _ = socket.recv_fds(channel, 16, 1)
    nbytes = int(sys.argv[2])
    shm = discache.DiscardableSharedMemory.open(fds[0], nbytes)
    channel.sendall(b"ready\n")  # the test goes on only once the segment is mapped here
    reader = channel.makefile("r")
    for line in reader:
        command, *args = line.split()
        try:
            if command == "lock":
                reply = shm.lock(*map(int, args)).name
            elif command == "unlock":
                shm.unlock(*map(int, args))
                reply = "ok"
            elif command == "purge":
                reply = str(shm.purge())
            elif command == "locked":
                reply = str(shm.is_memory_locked())
            elif command == "resident":
                reply = str(shm.is_memory_resident())
            elif command == "usage":
                reply = repr(shm.last_known_usage)
            elif command == "read":
                offset, size = map(int, args)
                reply = bytes(shm.data[offset:offset + size]).hex()
            elif command == "write":
                offset, payload = int(args[0]), bytes.fromhex(args[1])
                shm.data[offset:offset + len(payload)] = payload
                reply = "ok"
            elif command == "quit":
                shm.close()
                break
            else:
                reply = f"error unknown command {command}"
        except Exception as error:  # reported to the test, which asserts on it
            reply = f"error {type(error).__name__}"
        channel.sendall((reply + "\n").encode())
    channel.sendall(b"bye\n")


if __name__ == "__main__":
    main()
