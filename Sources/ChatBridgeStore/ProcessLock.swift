import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// An exclusive advisory lock on a file, held for the life of the process, so that only one process
/// uses an SQLite database at a time.
final class ProcessLock: Sendable {
    private let descriptor: Mutex<Int32?>
    let path: String

    struct HeldElsewhere: Error, CustomStringConvertible {
        let path: String
        var description: String {
            "another chatbridge process is already using this database (lock \(path) is held); stop it first, or use another database.url"
        }
    }

    struct CannotOpen: Error, CustomStringConvertible {
        let path: String
        let code: Int32
        var description: String { "cannot open lock file \(path): \(String(cString: strerror(code)))" }
    }

    init(path: String) throws {
        let fd = open(path, O_CREAT | O_RDWR | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw CannotOpen(path: path, code: errno) }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0 else {
            close(fd)
            throw HeldElsewhere(path: path)
        }
        self.descriptor = Mutex(fd)
        self.path = path
    }

    /// Releases the lock (once), so another process, or a later open in this one, may use the database.
    func release() {
        descriptor.withLock { descriptor in
            guard let fd = descriptor else { return }
            flock(fd, LOCK_UN)
            close(fd)
            descriptor = nil
        }
    }

    deinit { release() }
}
