import ArgumentParser
import AsyncHTTPClient
import ChatBridgeCore
import ChatBridgeDingTalk
import ChatBridgeHTTP
import ChatBridgeLark
import ChatBridgeLLM
import ChatBridgeServer
import Foundation
import Logging

struct Check: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Validate the configuration and print the effective settings with secrets masked.",
        discussion: "Secrets are shown only as set or not set, with a length class, never any of their characters (model keys in a pool only by fingerprint, sk-…abcd). Prints one line per problem (a bad value names its key); exits 1 if any is an error. With --probe it also sends one tiny request to the model with every key of every profile and, when DingTalk credentials are set, requests one access token, and when Lark is configured fetches a tenant token and the bot's info, and reports each as ok or the exact failure (\"cannot reach HOST: why; check llm.base_url and the network\")."
    )

    @OptionGroup var options: ConfigOption

    @Flag(help: "Also make one small model request, one DingTalk access-token request, and a Lark tenant-token and bot-info request.")
    var probe = false

    func run() async throws {
        let configuration = try await options.load()
        print("configuration: \(configuration.sourceFile ?? "no file") + environment")
        let settings = configuration.effectiveSettings()
        let width = settings.map(\.key.count).max() ?? 0
        for (key, value) in settings {
            print("  \(key.padding(toLength: width, withPad: " ", startingAt: 0))  \(value)")
        }
        if configuration.problems.isEmpty {
            print("no problems found")
        } else {
            for problem in configuration.problems { print(problem) }
        }
        var failed = !configuration.errors.isEmpty
        if probe {
            let client = OutboundHTTP.makeClient()
            var logger = Logger(label: "chatbridge")
            logger.logLevel = .critical
            // Every key of every profile, each by its fingerprint: a pool's dead key shows here before users
            // meet it. The default profile with one key keeps the short form.
            for profile in configuration.profiles {
                for key in profile.apiKeys.isEmpty ? [""] : profile.apiKeys {
                    var llm = profile.settings
                    llm.apiKey = key
                    llm.maxTokens = 16
                    llm.timeout = .seconds(30)
                    let label = configuration.profiles.count == 1 && profile.apiKeys.count <= 1
                        ? "probe model" : "probe model \(profile.name) key \(keyFingerprint(key))"
                    let model = OpenAIChatModel(settings: llm, client: client, logger: logger)
                    let started = ContinuousClock.now
                    do {
                        let completion = try await model.complete(ChatRequest(messages: [ChatMessage(role: .user, content: "Reply with the word ok.")])) { _ in }
                        let ms = Int((ContinuousClock.now - started).seconds * 1000)
                        print("\(label): ok (\(llm.model) at \(llm.completionsURL), \(ms) ms, replied \"\(completion.text.prefix(40))\")")
                    } catch {
                        failed = true
                        print("\(label): failed: \(error)")
                    }
                }
            }
            if configuration.dingtalk.hasOpenAPICredentials {
                let tokens = AccessTokenCache(settings: configuration.dingtalk, client: client)
                do {
                    _ = try await tokens.token()
                    print("probe dingtalk: ok (access token issued by \(configuration.dingtalk.apiBaseURL))")
                } catch {
                    failed = true
                    print("probe dingtalk: failed: \(error)")
                }
            } else {
                print("probe dingtalk: skipped (dingtalk.client_id and dingtalk.client_secret not both set)")
            }
            if configuration.lark.hasCredentials {
                let lark = LarkAPI(settings: configuration.lark, client: client, logger: logger)
                if let problem = await lark.probeToken() {
                    failed = true
                    print("probe lark token: failed: \(problem)")
                } else {
                    print("probe lark token: ok (tenant access token issued by \(configuration.lark.baseURL))")
                    do {
                        let bot = try await lark.botInfo()
                        print("probe lark bot: ok (\"\(bot.name)\", open_id \(bot.openID))")
                    } catch {
                        failed = true
                        print("probe lark bot: failed: \(error)")
                    }
                }
            } else {
                print("probe lark: skipped (lark.app_id and lark.app_secret not both set)")
            }
            try? await client.shutdown()
        }
        if failed { throw ExitCode(1) }
    }
}
