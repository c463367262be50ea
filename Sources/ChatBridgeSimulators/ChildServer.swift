import Foundation

/// A `chatbridge serve` child process, for crash tests and the bench. Its log goes to a file; the bound
/// port is read from the "listening on" line.
public final class ChildServer: @unchecked Sendable {
    public let process: Process
    public let logPath: String
    public private(set) var port: Int = 0

    /// Starts `executable serve` (or `arguments`) with `environment` added to this process's environment.
    public init(executable: String, environment: [String: String], logPath: String, arguments: [String] = ["serve"]) throws {
        process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        var env = ProcessInfo.processInfo.environment.filter { !$0.key.hasPrefix("CHATBRIDGE_") }
        env.merge(environment) { $1 }
        process.environment = env
        _ = FileManager.default.createFile(atPath: logPath, contents: nil)
        self.logPath = logPath
        let log = try FileHandle(forWritingTo: URL(fileURLWithPath: logPath))
        process.standardError = log
        process.standardOutput = log
        try process.run()
    }

    /// A server still running when the last reference to it goes (a test or a bench that failed half-way)
    /// is killed rather than left behind.
    deinit {
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
    }

    /// Waits until the server logs its port; throws if it exits first or `seconds` pass.
    public func waitUntilListening(seconds: Double = 60) async throws -> Int {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            let log = (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? ""
            if let range = log.range(of: "chatbridge listening on http://") {
                let rest = log[range.upperBound...]
                if let colon = rest.firstIndex(of: ":") {
                    let digits = rest[rest.index(after: colon)...].prefix(while: \.isNumber)
                    if let port = Int(digits) {
                        self.port = port
                        return port
                    }
                }
            }
            if !process.isRunning {
                throw SimulatorError(description: "chatbridge serve exited with status \(process.terminationStatus): \(log.suffix(2000))")
            }
            try await Task.sleep(for: .milliseconds(20))
        }
        throw SimulatorError(description: "chatbridge serve did not start listening within \(Int(seconds))s")
    }

    public func signal(_ signal: Int32) { kill(process.processIdentifier, signal) }

    /// Waits for the process to exit and returns its status.
    public func wait() async -> Int32 {
        while process.isRunning { try? await Task.sleep(for: .milliseconds(10)) }
        return process.terminationStatus
    }

    /// Resident set size now and at its peak, in bytes (Linux `/proc`).
    public func memory() -> (current: Int, peak: Int)? {
        guard let status = try? String(contentsOfFile: "/proc/\(process.processIdentifier)/status", encoding: .utf8) else { return nil }
        func field(_ name: String) -> Int? {
            guard let line = status.split(separator: "\n").first(where: { $0.hasPrefix(name + ":") }) else { return nil }
            return line.split(separator: " ").compactMap { Int($0) }.first.map { $0 * 1024 }
        }
        guard let current = field("VmRSS"), let peak = field("VmHWM") else { return nil }
        return (current, peak)
    }

    /// User plus system CPU time used so far, in seconds (Linux `/proc`).
    public func cpuSeconds() -> Double? {
        guard let stat = try? String(contentsOfFile: "/proc/\(process.processIdentifier)/stat", encoding: .utf8),
            let close = stat.lastIndex(of: ")")
        else { return nil }
        let fields = stat[stat.index(after: close)...].split(separator: " ")
        guard fields.count > 13, let user = Double(fields[11]), let system = Double(fields[12]) else { return nil }
        return (user + system) / Double(sysconf(Int32(_SC_CLK_TCK)))
    }
}
