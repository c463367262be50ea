import Foundation

/// Starting helper programs (`pg_ctl`, `taskset`, `perf`) and waiting for them: posix_spawn and waitpid, not
/// Foundation's Process, whose waiting is unreliable outside the main thread.
public enum Spawn {
    public struct Failure: Error, CustomStringConvertible {
        public var description: String
    }

    /// Starts `command` (absolute path first) with stdin from /dev/null and stdout and stderr to `output`.
    public static func start(_ command: [String], output: String) throws -> pid_t {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, output, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)
        // The calling thread may block or ignore signals (threads of a server do); the program starts with
        // none blocked and every one at its default, or a perf waiting for its child's SIGCHLD waits forever.
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var none = sigset_t()
        sigemptyset(&none)
        posix_spawnattr_setsigmask(&attributes, &none)
        var all = sigset_t()
        sigfillset(&all)
        sigdelset(&all, SIGKILL)
        sigdelset(&all, SIGSTOP)
        posix_spawnattr_setsigdefault(&attributes, &all)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
        let argv: [UnsafeMutablePointer<CChar>?] = command.map { strdup($0) } + [nil]
        defer { for pointer in argv { free(pointer) } }
        var pid: pid_t = 0
        let result = posix_spawn(&pid, command[0], &actions, &attributes, argv, environ)
        guard result == 0 else { throw Failure(description: "cannot start \(command[0]): \(String(cString: strerror(result)))") }
        return pid
    }

    /// Waits for a started program; its wait status (0 is a normal exit with 0; anything else, a signal
    /// included, is a failure; -1 when it could not be waited for).
    @discardableResult
    public static func wait(_ pid: pid_t) -> Int32 {
        var status: Int32 = 0
        while true {
            if waitpid(pid, &status, 0) != -1 { return status }
            if errno != EINTR { return -1 }
        }
    }

    /// Runs `command` to its end, its output in `output`; its exit status.
    @discardableResult
    public static func run(_ command: [String], output: String) throws -> Int32 {
        wait(try start(command, output: output))
    }
}
