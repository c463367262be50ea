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

@main
struct ChatBridgeCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "chatbridge",
        abstract: "An LLM assistant for DingTalk: answers every message exactly once, with multi-turn context.",
        discussion: "Settings come from a YAML file (--config, default ./chatbridge.yaml when present) and from environment variables, which win: CHATBRIDGE_ + the key path in upper case with '.' as '_' (llm.api_key → CHATBRIDGE_LLM_API_KEY). OPENAI_API_KEY and OPENAI_BASE_URL are accepted when the ChatBridge keys are unset. See chatbridge.example.yaml for every key.",
        version: "0.1.0",
        subcommands: [Serve.self, Chat.self, Check.self, Migrate.self, Bench.self],
        defaultSubcommand: nil
    )
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
        discussion: "With no configuration it listens on 0.0.0.0:8080 with its database at ./data/chatbridge.sqlite and logs what is still to configure. With dingtalk.client_id and dingtalk.client_secret set it also opens DingTalk's Stream connection (dingtalk.mode: stream, the default; http for callbacks only), so no public URL is needed. With dingtalk.card.template_id set, answers stream into AI cards. /metrics moves to its own address with server.metrics_address. SIGTERM or SIGINT closes the Stream connection, turns /readyz to 503 and lets answers in flight finish for up to server.drain_timeout (30s) while callbacks are still accepted (they are answered at the next start), then exits 0."
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
                    "port": "\(port)", "database": "\(configuration.databaseURL)", "model": "\(configuration.llm.model)",
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
    static let configuration = CommandConfiguration(abstract: "Apply database migrations and exit.")

    @OptionGroup var options: ConfigOption

    func run() async throws {
        let configuration = try await options.load()
        let location: DatabaseLocation
        do {
            location = try DatabaseLocation.parse(configuration.databaseURL)
        } catch {
            throw CleanExit.failure("\(error)")
        }
        var logger = Logger(label: "chatbridge")
        logger.logLevel = .warning
        do {
            let store = try await SQLStore.open(location, logger: logger)
            let version = try await store.schemaVersion()
            await store.close()
            print("\(location): schema version \(version) (latest \(SQLStore.latestVersion))")
        } catch {
            throw CleanExit.failure("\(error)")
        }
    }
}
