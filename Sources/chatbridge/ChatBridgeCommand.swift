import ArgumentParser
import AsyncHTTPClient
import ChatBridgeCore
import ChatBridgeDingTalk
import ChatBridgeLLM
import ChatBridgeServer
import ChatBridgeStore
import Foundation
import Hummingbird
import Logging
import NIOCore
import NIOPosix

@main
struct ChatBridgeCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "chatbridge",
        abstract: "An LLM assistant for DingTalk: answers every message exactly once, with multi-turn context.",
        discussion: "Settings come from a YAML file (--config, default ./chatbridge.yaml when present) and from environment variables, which win: CHATBRIDGE_ + the key path in upper case with '.' as '_' (llm.api_key → CHATBRIDGE_LLM_API_KEY). OPENAI_API_KEY and OPENAI_BASE_URL are accepted when the ChatBridge keys are unset. See chatbridge.example.yaml for every key.",
        version: "0.1.0",
        subcommands: [Serve.self, Chat.self, Check.self, Migrate.self, Usage.self, Bench.self],
        defaultSubcommand: nil
    )

    /// Before anything else, the threads: NIO's event loops are as many as the CPUs this process may run on
    /// (its affinity mask, as `taskset` or a container's cpuset sets it), not every CPU of the machine,
    /// unless `NIO_SINGLETON_GROUP_LOOP_COUNT` says otherwise. With one usable CPU, Swift concurrency's jobs
    /// also run on that event loop instead of a thread pool of their own: on one CPU a second pool adds only
    /// hand-offs between threads (`chatbridge bench` pinned to one CPU: about 15% less CPU per answer and a
    /// lower acknowledgement p99). With more CPUs the pool stays separate: there, handlers sharing the
    /// event loops with a thousand model streams made acknowledgements slower at 500 callbacks/s. (One loop
    /// also follows from a CPU quota of one or `NIO_SINGLETON_GROUP_LOOP_COUNT=1`. NIO takes over the global
    /// queue, not delayed jobs: a job resumed after a sleep may still start on a libdispatch thread.)
    /// `CHATBRIDGE_EXECUTOR=event-loops` or `=pool` overrides the choice (read at start only; not a YAML key).
    static func main() async {
        let environment = ProcessInfo.processInfo.environment
        let usable = usableCPUs() ?? System.coreCount
        if environment["NIO_SINGLETON_GROUP_LOOP_COUNT"] == nil, usable < System.coreCount {
            NIOSingletons.groupLoopCountSuggestion = usable
        }
        let onEventLoops: Bool
        switch environment["CHATBRIDGE_EXECUTOR"] {
        case "event-loops": onEventLoops = true
        case "pool": onEventLoops = false
        default: onEventLoops = NIOSingletons.groupLoopCountSuggestion == 1
        }
        if onEventLoops, NIOSingletons.unsafeTryInstallSingletonPosixEventLoopGroupAsConcurrencyGlobalExecutor() {
            executor = "event-loops"
        }
        await main(nil)
    }

    /// Where Swift concurrency's jobs run (`pool` or `event-loops`), logged when the server starts. Set once,
    /// in `main`, before anything reads it.
    nonisolated(unsafe) static var executor = "pool"

    /// The number of CPUs in this process's affinity mask (`Cpus_allowed` in /proc/self/status), or nil
    /// where it cannot be read.
    static func usableCPUs() -> Int? {
        guard let status = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8),
            let line = status.split(separator: "\n").first(where: { $0.hasPrefix("Cpus_allowed:") })
        else { return nil }
        var count = 0
        for character in line.dropFirst("Cpus_allowed:".count) where character != "," && !character.isWhitespace {
            guard let digit = character.hexDigitValue else { return nil }
            count += digit.nonzeroBitCount
        }
        return count > 0 ? count : nil
    }
}

/// The `--config` option every command shares.
struct ConfigOption: ParsableArguments {
    @Option(name: .long, help: ArgumentHelp("YAML configuration file. Default: ./chatbridge.yaml if it exists; environment variables override it.", valueName: "file"))
    var config: String?

    func load() async throws -> ChatBridgeConfiguration {
        do {
            return try await ChatBridgeConfiguration.load(file: config)
        } catch {
            throw CleanExit.failure("\(error)")
        }
    }
}

enum CleanExit {
    /// Prints `error: message` on standard error and exits with status 1.
    static func failure(_ message: String) -> ExitCode {
        FileHandle.standardError.write(Data("error: \(message)\n".utf8))
        return ExitCode(1)
    }
}

struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the server: the DingTalk Stream connection, callbacks at POST /callbacks/dingtalk, /healthz, /readyz, /metrics.",
        discussion: "With no configuration it listens on 0.0.0.0:8080 with its database at ./data/chatbridge.sqlite and logs what is still to configure. With database.url set to postgres://USER:PASSWORD@HOST:5432/DB any number of serve processes share one database and answer each message once. With dingtalk.client_id and dingtalk.client_secret set it also opens DingTalk's Stream connection (dingtalk.mode: stream, the default; http for callbacks only), so no public URL is needed. With dingtalk.card.template_id set, answers stream into AI cards. /metrics moves to its own address with server.metrics_address. SIGHUP (or a change of the configuration file, config.watch) reloads model profiles, personas, routes, access, limits and safety without a restart; a file with errors is rejected and the running configuration kept. SIGTERM or SIGINT closes the Stream connection, turns /readyz to 503 and lets answers in flight finish for up to server.drain_timeout (30s) while callbacks are still accepted (they are answered at the next start), then exits 0."
    )

    @OptionGroup var options: ConfigOption

    func run() async throws {
        let configuration = try await options.load()
        Telemetry.bootstrapLogging(format: configuration.log.format, level: configuration.log.level)
        let metrics = Telemetry.bootstrapMetrics()
        let logger = Logger(label: "chatbridge")
        guard configuration.errors.isEmpty else {
            for problem in configuration.errors { logger.error("\(problem)") }
            throw CleanExit.failure("the configuration has \(configuration.errors.count) error(s); run 'chatbridge check' for details")
        }
        for problem in configuration.warnings {
            logger.warning("to configure: \(problem.key): \(problem.message)")
        }
        let host = configuration.server.host
        let app: ChatBridgeApplication
        do {
            app = try await buildApplication(configuration: configuration, logger: logger, metrics: metrics) { port in
                logger.notice("chatbridge listening on http://\(host):\(port)", metadata: [
                    "port": "\(port)", "database": "\(configuration.maskedDatabaseURL)", "model": "\(configuration.llm.model)",
                    "event_loops": "\(NIOSingletons.groupLoopCountSuggestion)", "executor": "\(ChatBridgeCommand.executor)",
                ])
            }
        } catch {
            throw CleanExit.failure("\(error)")
        }
        do {
            try await app.runService()
        } catch let error as ListenError {
            throw CleanExit.failure(error.description)
        }
        logger.info("chatbridge stopped")
    }
}

struct Migrate: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Apply database migrations and exit, or copy a whole database into a new one.",
        discussion: """
            Without options: brings the configured database (database.url) to the schema of this build. Safe while \
            other replicas start: one migrates, the others wait and find the schema current. A database newer \
            than this build is refused.

            With --from and --to: copies every conversation, turn and inbox message of one database into another, \
            empty one (both are migrated first), in one transaction, and checks the counts; for moving from SQLite \
            to PostgreSQL: chatbridge migrate --from sqlite:data/chatbridge.sqlite --to postgres://USER:PASSWORD@HOST:5432/DB. \
            Stop the server using the source first.
            """)

    @OptionGroup var options: ConfigOption

    @Option(help: "The database to copy from (a database URL, e.g. sqlite:data/chatbridge.sqlite).")
    var from: String?

    @Option(help: "The empty database to copy into (a database URL, e.g. postgres://USER:PASSWORD@HOST:5432/DB).")
    var to: String?

    func run() async throws {
        var logger = Logger(label: "chatbridge")
        logger.logLevel = .warning
        if from != nil || to != nil {
            guard let from, let to else { throw CleanExit.failure("--from and --to go together: chatbridge migrate --from sqlite:PATH --to postgres://…") }
            try await copy(from: from, to: to, logger: logger)
            return
        }
        let configuration = try await options.load()
        let location: DatabaseLocation
        do {
            location = try DatabaseLocation.parse(configuration.databaseURL)
        } catch {
            throw CleanExit.failure("\(error)")
        }
        do {
            let store = try await SQLStore.open(location, options: .init(poolSize: 2), logger: logger)
            let version = try await store.schemaVersion()
            await store.close()
            print("\(location): schema version \(version) (latest \(SQLStore.latestVersion))")
        } catch {
            throw CleanExit.failure("\(error)")
        }
    }

    private func copy(from: String, to: String, logger: Logger) async throws {
        let source: DatabaseLocation
        let target: DatabaseLocation
        do {
            source = try DatabaseLocation.parse(from)
            target = try DatabaseLocation.parse(to)
        } catch {
            throw CleanExit.failure("\(error)".replacingOccurrences(of: "database.url", with: "--from/--to"))
        }
        guard source != target else { throw CleanExit.failure("--from and --to name the same database") }
        // A mistyped source path must not become a new, empty database "copied" successfully.
        if case .sqliteFile(let path) = source, !FileManager.default.fileExists(atPath: path) {
            throw CleanExit.failure("--from: there is no SQLite database at \(path)")
        }
        var stores: [SQLStore] = []
        do {
            let sourceStore = try await SQLStore.open(source, options: .init(poolSize: 2), logger: logger)
            stores.append(sourceStore)
            let targetStore = try await SQLStore.open(target, options: .init(poolSize: 2), logger: logger)
            stores.append(targetStore)
            let copied = try await targetStore.copyEverything(from: sourceStore)
            for store in stores { await store.close() }
            print("copied \(copied) from \(source) to \(target); the counts match")
        } catch {
            for store in stores { await store.close() }
            throw CleanExit.failure("\(error)")
        }
    }
}
