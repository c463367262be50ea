import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// A throwaway PostgreSQL server for tests and benchmarks: a new cluster in a temporary directory, on a
/// free loopback port, from the Debian `postgresql` server binaries (`/usr/lib/postgresql/N/bin`). Run as
/// root, the server runs as `nobody` (PostgreSQL refuses to run as root). It is tuned for speed, not
/// durability (`fsync` off). A watchdog process stops it and removes the directory when the process that
/// started it exits, however it exits.
public final class PostgresCluster: Sendable {
    public struct Failure: Error, CustomStringConvertible {
        public var description: String
        public init(description: String) { self.description = description }
    }

    public let directory: String
    public let port: Int
    private let binaries: String

    /// The directory holding `initdb` and `pg_ctl` of the newest installed server, or nil.
    public static var binaryDirectory: String? {
        let root = "/usr/lib/postgresql"
        let versions = (try? FileManager.default.contentsOfDirectory(atPath: root)) ?? []
        let sorted = versions.compactMap { Int($0) }.sorted(by: >)
        for version in sorted {
            let bin = "\(root)/\(version)/bin"
            if FileManager.default.isExecutableFile(atPath: bin + "/initdb"), FileManager.default.isExecutableFile(atPath: bin + "/pg_ctl") {
                return bin
            }
        }
        return nil
    }

    /// The superuser's URL for `database` (no password: the cluster trusts loopback connections).
    public func url(database: String = "postgres") -> String {
        "postgres://postgres@127.0.0.1:\(port)/\(database)?sslmode=disable"
    }

    private init(directory: String, port: Int, binaries: String) {
        self.directory = directory
        self.port = port
        self.binaries = binaries
    }

    /// Creates and starts a new cluster.
    public static func start() throws -> PostgresCluster {
        guard let binaries = binaryDirectory else {
            throw Failure(description: "no PostgreSQL server binaries under /usr/lib/postgresql (apt-get install postgresql)")
        }
        let directory = NSTemporaryDirectory() + "chatbridge-pg-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        if getuid() == 0 { chown(directory, 65534, 65534) }
        let port = try freePort()
        let cluster = PostgresCluster(directory: directory, port: port, binaries: binaries)
        try cluster.run(binaries + "/initdb", ["-D", cluster.dataDirectory, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync", "--no-instructions"])
        try cluster.startServer()
        cluster.watchParent()
        return cluster
    }

    private var dataDirectory: String { directory + "/data" }

    /// Starts the server (again, after ``stop()``), waiting until it accepts connections.
    public func startServer() throws {
        let options = [
            "-p \(port)", "-k \(directory)", "-c listen_addresses=127.0.0.1", "-c fsync=off",
            "-c full_page_writes=off", "-c max_connections=400", "-c shared_buffers=64MB",
        ].joined(separator: " ")
        try run(binaries + "/pg_ctl", ["-D", dataDirectory, "-o", options, "-l", directory + "/server.log", "-w", "-t", "60", "start"])
    }

    /// Stops the server: `fast` disconnects every client and shuts down cleanly (a restart or a failover);
    /// `immediate` is like a crash (committed data survives: commits are synchronous, only the operating
    /// system's flush is skipped).
    public func stop(immediately: Bool = false) throws {
        try run(binaries + "/pg_ctl", ["-D", dataDirectory, "-m", immediately ? "immediate" : "fast", "-w", "stop"])
    }

    /// CPU time the server has used since it started, in seconds: the postmaster with the sessions it has
    /// reaped, and the sessions still running (Linux `/proc`); nil when it is not running.
    public func cpuSeconds() -> Double? {
        guard let pidFile = try? String(contentsOfFile: dataDirectory + "/postmaster.pid", encoding: .utf8),
            let postmaster = pidFile.split(separator: "\n").first.flatMap({ Int32($0) })
        else { return nil }
        /// utime, stime, cutime, cstime and the parent's pid of a process, from `/proc/PID/stat`.
        func times(_ pid: String) -> (own: Double, children: Double, parent: Int32)? {
            guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8), let close = stat.lastIndex(of: ")") else { return nil }
            let fields = stat[stat.index(after: close)...].split(separator: " ")
            guard fields.count > 14, let parent = Int32(fields[1]), let user = Double(fields[11]), let system = Double(fields[12]),
                let childUser = Double(fields[13]), let childSystem = Double(fields[14])
            else { return nil }
            return (user + system, childUser + childSystem, parent)
        }
        guard let main = times("\(postmaster)") else { return nil }
        var ticks = main.own + main.children
        for entry in (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? [] where entry.first?.isNumber == true {
            if let process = times(entry), process.parent == postmaster { ticks += process.own }
        }
        return ticks / Double(sysconf(Int32(_SC_CLK_TCK)))
    }

    /// Stops the server and removes its directory.
    public func destroy() {
        try? stop(immediately: true)
        try? FileManager.default.removeItem(atPath: directory)
    }

    /// A server command line, run as `nobody` when this process is root.
    private static func asServerUser(_ command: [String]) -> [String] {
        getuid() == 0 ? ["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] + command : command
    }

    /// Runs a server binary and waits for it.
    private func run(_ executable: String, _ arguments: [String]) throws {
        let command = Self.asServerUser([executable] + arguments)
        // Output to a file, not a pipe: the server started by pg_ctl would hold a pipe open for its whole life.
        let outputPath = directory + "/command.out"
        let status = Spawn.wait(try Self.spawn(command, output: outputPath))
        guard status == 0 else {
            let printed = (try? String(contentsOfFile: outputPath, encoding: .utf8)) ?? ""
            let log = (try? String(contentsOfFile: directory + "/server.log", encoding: .utf8)) ?? ""
            throw Failure(description: "\((executable as NSString).lastPathComponent) failed: \(printed.suffix(800)) \(log.suffix(800))")
        }
    }

    /// A detached watchdog: when this process is gone, stop the server and remove the directory.
    private func watchParent() {
        func quoted(_ word: String) -> String { "'" + word.replacingOccurrences(of: "'", with: "'\\''") + "'" }
        let stop = Self.asServerUser([binaries + "/pg_ctl", "-D", dataDirectory, "-m", "immediate", "stop"]).map(quoted).joined(separator: " ")
        let script = "while kill -0 \(getpid()) 2>/dev/null; do sleep 0.5; done; \(stop) >/dev/null 2>&1; rm -rf \(quoted(directory))"
        _ = try? Self.spawn(["/usr/bin/setsid", "/bin/sh", "-c", script], output: "/dev/null")
    }

    private static func spawn(_ command: [String], output: String) throws -> pid_t {
        do {
            return try Spawn.start(command, output: output)
        } catch let failure as Spawn.Failure {
            throw Failure(description: failure.description)
        }
    }

    /// A loopback TCP port nothing listens on now.
    static func freePort() throws -> Int {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw Failure(description: "socket() failed") }
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = 0
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard bound == 0 else { throw Failure(description: "bind() failed") }
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        return Int(UInt16(bigEndian: address.sin_port))
    }
}
