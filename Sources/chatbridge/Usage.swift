import ArgumentParser
import ChatBridgeCore
import ChatBridgeServer
import ChatBridgeStore
import Foundation
import Logging

struct Usage: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Print recorded usage (answers, tokens, estimated cost) summed by user, chat, model, key or day.",
        discussion: """
            Reads the configured database (database.url); safe while the server runs, also on SQLite. Days are \
            calendar days in bot.timezone (default Asia/Shanghai), YYYY-MM-DD, both ends included; the default is \
            this month so far. Cost uses each profile's price.input / price.output per million tokens as they were \
            when the answer was recorded. Users and chats are written platform:id; keys only by fingerprint (sk-…abcd).
            """)

    @OptionGroup var options: ConfigOption

    @Option(help: ArgumentHelp("First day, YYYY-MM-DD. Default: the first of this month.", valueName: "date"))
    var since: String?

    @Option(help: ArgumentHelp("Last day, YYYY-MM-DD. Default: today.", valueName: "date"))
    var until: String?

    @Option(help: ArgumentHelp("Sum by user, chat, model, key or day.", valueName: "group"))
    var by: String = "user"

    @Option(help: ArgumentHelp("table, csv or json.", valueName: "format"))
    var format: String = "table"

    func run() async throws {
        guard let grouping = UsageGrouping(rawValue: by.lowercased()), grouping != .total else {
            throw CleanExit.failure("--by must be user, chat, model, key or day, got '\(by.prefix(40))'")
        }
        guard let output = UsageReport.Format(rawValue: format.lowercased()) else {
            throw CleanExit.failure("--format must be table, csv or json, got '\(format.prefix(40))'")
        }
        for (name, value) in [("--since", since), ("--until", until)] {
            if let value, !DayCalendar.isDay(value) { throw CleanExit.failure("\(name) must be a date written YYYY-MM-DD, got '\(value.prefix(40))'") }
        }
        let configuration = try await options.load()
        let calendar = configuration.controls.calendar
        let now = Date()
        let first = since ?? calendar.firstDayOfMonth(of: now)
        let last = until ?? calendar.day(of: now)
        guard first <= last else { throw CleanExit.failure("--since \(first) is after --until \(last)") }
        var logger = Logger(label: "chatbridge")
        logger.logLevel = .warning
        do {
            let location = try DatabaseLocation.parse(configuration.databaseURL)
            let store = try await SQLStore.open(location, options: .init(poolSize: 2, reader: true), logger: logger)
            do {
                let report = try await UsageReport.make(ledger: store, since: first, until: last, grouping: grouping)
                await store.close()
                print(report.render(output), terminator: "")
            } catch {
                await store.close()
                throw error
            }
        } catch {
            throw CleanExit.failure("\(error)")
        }
    }
}
